"""The ONNX Runtime rewrite: ConvTranspose(k4, s2, p1) -> phase convolutions, exact for float
and Q/DQ graphs (no scale of its own; quantized layers end in the graph's own Q)."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from avatarq.errors import AvatarqError
from avatarq.export import ExportOptions, export_bundle
from avatarq.export.rewrite_ort import (
    PHASES,
    OrtRewriteConfig,
    default_calibration_feeds,
    merged_phase_weights,
    phase_pads,
    phase_weights,
    rewrite_for_ort,
)
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint


@pytest.fixture(scope="module")
def float_model(tiny) -> onnx.ModelProto:
    return onnx.load(str(tiny / "dam.avq" / "model.onnx"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random base DAM (z 16, texture 64, 4 ConvTranspose layers 16-16-16-16-3)."""
    torch.manual_seed(0)
    config = DAMConfig(z_dim=16, tex_size=64, n_vertices=30, n_cams=4, has_encoder=False)
    model = DeepAppearanceModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("rewrite")
    save_checkpoint(model, root / "dam.pt")
    export_bundle(root / "dam.pt", root / "dam.avq", options=ExportOptions(validate=False))
    return root


def _quantize_static(float_model, root, symmetric=True) -> onnx.ModelProto:
    """ORT's quantize_static with avatarq's placement: per-tensor Q/DQ on the inputs of
    ConvTranspose/Gemm (int8 symmetric, or uint8 asymmetric), int8 per-output-channel
    weights, nothing on their outputs, biases in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = default_calibration_feeds(float_model, 8, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(8)])

        def get_next(self):
            return next(self.items, None)

    onnx.save(float_model, root / "float.onnx")
    quantize_static(
        str(root / "float.onnx"),
        str(root / "qdq.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["ConvTranspose", "Gemm"],
        extra_options={
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["ConvTranspose", "Gemm"],
        },
    )
    return onnx.load(str(root / "qdq.onnx"))


@pytest.fixture(scope="module")
def qdq_model(float_model, tmp_path_factory) -> onnx.ModelProto:
    """The graph with Q/DQ as avatarq places it (by ORT's quantize_static): int8 symmetric
    per-tensor on the inputs of ConvTranspose/Gemm, int8 per-output-channel weights,
    nothing on their outputs."""
    return _quantize_static(float_model, tmp_path_factory.mktemp("qdq"))


@pytest.fixture(scope="module")
def avatarq_qdq_model(tiny) -> onnx.ModelProto:
    """avatarq's own Q/DQ graph: max calibration + `avatarq.export.qdq.quantize_onnx`."""
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_latents
    from avatarq.core.inputs import smooth_clip
    from avatarq.export.qdq import quantize_onnx
    from avatarq.models import DeployableDecoder, load_checkpoint

    decoder = DeployableDecoder(load_checkpoint(tiny / "dam.pt"))
    samples = samples_from_latents(smooth_clip(16, 32), n_random=8, n_clips=0)
    artifact = calibrate(decoder, samples, CalibrationConfig(method="max"))
    return quantize_onnx(onnx.load(str(tiny / "dam.avq" / "model.onnx")), artifact)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["texture", "vertices"], feeds)


def _optimized_ops(model: onnx.ModelProto, path) -> Counter:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _feeds(model, n=3):
    return default_calibration_feeds(model, n, seed=7)


def _psnr(reference: np.ndarray, candidate: np.ndarray, peak: float) -> float:
    mse = float(np.mean((candidate.astype(np.float64) - reference) ** 2))
    return np.inf if mse == 0 else 10 * np.log10(peak**2 / mse)


def _input_scales(model: onnx.ModelProto) -> list[float]:
    """Scale of the QuantizeLinear in front of each ConvTranspose, graph order."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    scales = []
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            dq = producer[node.input[0]]
            scales.append(float(inits[dq.input[1]]))
    return scales


def test_phase_convolutions_reproduce_conv_transpose_exactly():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 5, 6, 7)))
    w = rng.standard_normal((5, 4, 4, 4))
    reference = F.conv_transpose2d(x, torch.from_numpy(w), stride=2, padding=1)
    out = torch.zeros_like(reference)
    for (a, b), wp in zip(PHASES, phase_weights(w), strict=True):
        top, left, bottom, right = phase_pads(a, b)
        out[:, :, a::2, b::2] = F.conv2d(F.pad(x, (left, right, top, bottom)), torch.from_numpy(wp))
    assert torch.abs(out - reference).max().item() < 1e-12


def test_merged_phase_conv_read_channels_last_is_the_conv_transpose_plus_a_border():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((2, 5, 6, 7)))
    w = rng.standard_normal((5, 4, 4, 4))
    reference = F.conv_transpose2d(x, torch.from_numpy(w), stride=2, padding=1)
    merged = F.conv2d(x, torch.from_numpy(merged_phase_weights(w)), padding=1)  # [2, 16, 7, 8]
    blocks = merged.permute(0, 2, 3, 1).reshape(2, 7, 8, 2, 2, 4)  # n, i, j, u, v, c
    image = blocks.permute(0, 1, 3, 2, 4, 5).reshape(2, 14, 16, 4)[:, 1:13, 1:15]
    assert torch.abs(image.permute(0, 3, 1, 2) - reference).max().item() < 1e-12


def test_phase_weights_only_rearrange_the_values():
    w = np.arange(3 * 2 * 16, dtype=np.int8).reshape(3, 2, 4, 4)
    phases = phase_weights(w)
    assert phases.shape == (4, 2, 3, 2, 2) and phases.dtype == np.int8
    assert sorted(phases.ravel().tolist()) == sorted(w.ravel().tolist())


def test_float_graph_rewrite_matches_the_original_to_float_rounding(float_model):
    result = rewrite_for_ort(float_model)
    feeds = _feeds(float_model)
    (ref_tex, ref_vert), (tex, vert) = _run(float_model, feeds), _run(result.model, feeds)
    span = ref_tex.max() - ref_tex.min()
    assert np.abs(tex - ref_tex).max() <= 1e-6 * span
    assert np.abs(vert - ref_vert).max() <= 1e-6 * np.abs(ref_vert).max()
    assert [layer.mode for layer in result.layers] == ["float"] * 4
    assert "ConvTranspose" not in {n.op_type for n in result.model.graph.node}


def test_rewrite_keeps_inputs_outputs_opset_and_ir_version(float_model):
    rewritten = rewrite_for_ort(float_model).model
    assert [i.name for i in rewritten.graph.input] == ["z", "view"]
    assert [o.name for o in rewritten.graph.output] == ["texture", "vertices"]
    assert rewritten.ir_version == float_model.ir_version
    assert list(rewritten.opset_import) == list(float_model.opset_import)
    onnx.checker.check_model(rewritten)


def test_output_layer_absorbs_the_texture_gain_and_offset(float_model):
    # texture = (deconv + texel bias) * tex_gain + tex_offset: gain into the weights, both
    # additive terms into one Add.
    before = Counter(n.op_type for n in float_model.graph.node)
    after = Counter(n.op_type for n in rewrite_for_ort(float_model).model.graph.node)
    assert before["Mul"] - after["Mul"] == 1
    assert before["Add"] - after["Add"] == 1


def test_int8_layers_requantize_with_the_next_layers_own_input_scale(qdq_model):
    # The rewrite has no scale of its own: each int8 layer ends in the QuantizeLinear that
    # fed the next ConvTranspose in the Q/DQ graph.
    result = rewrite_for_ort(qdq_model)
    assert [layer.mode for layer in result.layers] == ["int8", "int8", "int8", "float"]
    assert [layer.output_scale for layer in result.layers[:3]] == _input_scales(qdq_model)[1:]


def test_int8_layers_interleave_8bit_data_and_leave_no_conv_transpose(qdq_model, tmp_path):
    ops = _optimized_ops(rewrite_for_ort(qdq_model).model, tmp_path / "rewritten.onnx")
    optimized = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "rewritten.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in optimized.graph.value_info}
    blocks = [n for n in optimized.graph.node if n.op_type == "Transpose" and len(n.attribute)]
    six_d = [n for n in blocks if list(n.attribute[0].ints) == [0, 1, 3, 2, 4, 5]]
    assert ops["ConvTranspose"] == 0
    assert len(six_d) == 3  # one interleave per int8 layer
    assert {types[n.output[0]] for n in six_d} == {TensorProto.INT8}


def test_avatarq_qdq_graph_rewrite_equals_the_graph_up_to_rounding(avatarq_qdq_model):
    result = rewrite_for_ort(avatarq_qdq_model)
    assert [layer.mode for layer in result.layers] == ["int8", "int8", "int8", "float"]
    feeds = _feeds(avatarq_qdq_model, 4)
    ref_tex, tex = _run(avatarq_qdq_model, feeds)[0], _run(result.model, feeds)[0]
    assert _psnr(ref_tex, tex, float(ref_tex.max() - ref_tex.min())) >= 100.0


def test_asymmetric_uint8_activations_are_rewritten_exactly_too(float_model, tmp_path):
    model = _quantize_static(float_model, tmp_path, symmetric=False)
    result = rewrite_for_ort(model)
    assert [layer.mode for layer in result.layers] == ["int8", "int8", "int8", "float"]
    feeds = _feeds(model, 4)
    ref_tex, tex = _run(model, feeds)[0], _run(result.model, feeds)[0]
    assert _psnr(ref_tex, tex, float(ref_tex.max() - ref_tex.min())) >= 100.0


def test_plain_qdq_conv_transpose_runs_in_float_in_onnxruntime(qdq_model, tmp_path):
    # Why the rewrite exists: ORT has no INT8 ConvTranspose, the Q/DQ stay around a float op.
    ops = _optimized_ops(qdq_model, tmp_path / "plain.onnx")
    assert ops["ConvTranspose"] == 4
    assert ops["QLinearConv"] == 0


def test_int8_rewrite_equals_the_qdq_graph_up_to_rounding(qdq_model):
    result = rewrite_for_ort(qdq_model)
    feeds = _feeds(qdq_model, 4)
    (ref_tex, ref_vert), (tex, vert) = _run(qdq_model, feeds), _run(result.model, feeds)
    assert _psnr(ref_tex, tex, float(ref_tex.max() - ref_tex.min())) >= 100.0
    assert np.array_equal(vert, ref_vert)  # the mesh branch has no ConvTranspose


def test_int8_rewrite_matches_its_qdq_graph_on_real_latent_codes(small_avatar, small_bundle):
    # Regression: the rewrite once calibrated its own uint8 output scales on seeded N(0, 1)
    # latents; a trained encoder's codes are far from unit variance and clipped there
    # (46 dB here, 64 dB on the demo avatar). The graph, calibrated on real codes, is the
    # reference; the rewrite must reproduce it (exact up to rounding-boundary flips).
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_capture
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization, encode_frames
    from avatarq.export.qdq import quantize_onnx
    from avatarq.models import DeployableDecoder, load_checkpoint

    model = load_checkpoint(small_avatar.checkpoint)
    capture = MultifaceCapture(small_avatar.capture_root)
    samples = samples_from_capture(model, capture, n_random=16, n_clips=0, seed=0)
    decoder = DeployableDecoder(model, capture_normalization(capture))
    artifact = calibrate(decoder, samples, CalibrationConfig(method="max"))
    qdq = quantize_onnx(onnx.load(str(small_bundle / "model.onnx")), artifact)
    segment, frames = next(capture.clips())
    z = encode_frames(model, capture, [(segment, f) for f in frames]).numpy()
    feeds = {"z": z, "view": np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(z), 1))}
    result = rewrite_for_ort(qdq)
    assert [layer.mode for layer in result.layers] == ["int8", "int8", "int8", "float"]
    ref_tex, tex = _run(qdq, feeds)[0], _run(result.model, feeds)[0]
    assert _psnr(ref_tex, tex, 255.0) >= 90.0


def test_narrow_output_layer_stays_float_with_its_reason(qdq_model):
    last = rewrite_for_ort(qdq_model).layers[-1]
    assert (last.mode, last.reason, last.output_scale) == ("float", "3 output channels < 8", None)


def test_a_layer_whose_output_reaches_no_quantize_stays_float(qdq_model):
    # With the channel threshold out of the way, the output layer is still float: its
    # output goes to the texture, there is no Q (and no scale) to requantize with.
    last = rewrite_for_ort(qdq_model, OrtRewriteConfig(min_int8_out_channels=1)).layers[-1]
    assert (last.mode, last.output_scale) == ("float", None)
    assert last.reason == "output reaches no QuantizeLinear through single-consumer elementwise ops"


def test_gemm_weight_dequantize_is_folded_into_float_weights(qdq_model):
    result = rewrite_for_ort(qdq_model)
    inits = {i.name for i in result.model.graph.initializer}
    gemm_weights = [n.input[1] for n in result.model.graph.node if n.op_type == "Gemm"]
    assert result.folded_weight_dq == 4
    assert all(name in inits for name in gemm_weights)


def test_int8_tail_of_per_channel_gain_texel_bias_and_clip_is_reproduced():
    # Q/DQ -> ConvTranspose -> Mul (per channel) -> Add (per texel) -> Clip -> Q -> DQ: every
    # tail node is repeated on the merged conv output with its constant re-laid.
    rng = np.random.default_rng(3)
    c, h = 8, 5

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        init("sx", np.float32(0.05)),
        init("zx", np.int8(0)),
        init("wq", rng.integers(-127, 128, (4, c, 4, 4)).astype(np.int8)),
        init("ws", (rng.random(c) * 0.002 + 0.001).astype(np.float32)),
        init("wz", np.zeros(c, np.int8)),
        init("gain", (rng.random((1, c, 1, 1)) + 0.5).astype(np.float32)),
        init("bias", rng.standard_normal((1, c, 2 * h, 2 * h)).astype(np.float32)),
        init("lo", np.float32(-1.0)),
        init("hi", np.float32(1.5)),
        init("sy", np.float32(0.02)),
        init("zy", np.int8(0)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("ConvTranspose", ["xd", "wd"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["gain", "y"], ["g"]),
        helper.make_node("Add", ["g", "bias"], ["b"]),
        helper.make_node("Clip", ["b", "lo", "hi"], ["clipped"]),
        helper.make_node("QuantizeLinear", ["clipped", "sy", "zy"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "sy", "zy"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, h, h])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, c, 2 * h, 2 * h])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    result = rewrite_for_ort(model)
    assert [(layer.mode, layer.output_scale) for layer in result.layers] == [
        ("int8", np.float32(0.02).item())
    ]
    assert "ConvTranspose" not in {n.op_type for n in result.model.graph.node}
    x = rng.standard_normal((2, 4, h, h)).astype(np.float32)
    (ref,), (out,) = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["out"], {"x": x}
        )
        for m in (model, result.model)
    )
    assert np.mean(out != ref) < 1e-3  # rounding-boundary flips only
    assert np.abs(out - ref).max() <= 0.02 + 1e-7  # one step where they happen


def test_conv_transpose_that_is_not_k4_s2_p1_is_kept():
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    result = rewrite_for_ort(model)
    assert [(layer.node, layer.mode, layer.reason) for layer in result.layers] == [
        ("up", "kept", "strides [1, 1]")
    ]
    assert [n.op_type for n in result.model.graph.node] == ["ConvTranspose"]


def test_rewrite_config_round_trips_through_json():
    import json

    config = OrtRewriteConfig(min_int8_out_channels=4, fold_weight_dq=False)
    assert OrtRewriteConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_int8_out_channels": 0},
        {"version": 1},
    ],
)
def test_rewrite_config_rejects_bad_values(kwargs):
    with pytest.raises(AvatarqError):
        OrtRewriteConfig(**kwargs)
