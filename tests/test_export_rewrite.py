"""The ONNX Runtime engine rewrite (`avatarq.export.ort_rewrite`): phase maths, the exact
evaluation of Q/DQ graphs, and INT8 engines on integer kernels that equal it bit for bit."""

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
from avatarq.export.ort_rewrite import (
    EXACT_DISABLED_OPTIMIZERS,
    PHASES,
    OrtRewriteConfig,
    exact_reference,
    merged_phase_weights,
    phase_gemm_weights,
    phase_pads,
    phase_weights,
    rewrite_for_ort,
)
from avatarq.export.ort_rewrite.phases import phases_constant
from avatarq.models import DAMConfig
from ort_models import multiface_checkpoint, qdq_graph, smooth_clip

TINY = dict(z_dim=16, tex_size=64, n_vertices=30, n_cams=4, has_encoder=False)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{arch: (float model.onnx, avatarq's Q/DQ graph)} of Multiface-initialized decoders
    (z 16, texture 64, random texel biases)."""
    found = {}
    for arch in ("base", "res", "non", "bilinear"):
        root = tmp_path_factory.mktemp(arch)
        checkpoint = multiface_checkpoint(root / "dam.pt", DAMConfig(arch=arch, **TINY))
        export_bundle(checkpoint, root / "dam.avq", options=ExportOptions(validate=False))
        model_onnx = root / "dam.avq" / "model.onnx"
        found[arch] = (onnx.load(str(model_onnx)), qdq_graph(checkpoint, model_onnx))
    return found


def _session(model: onnx.ModelProto, exact: bool = False, optimized: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    disabled = list(EXACT_DISABLED_OPTIMIZERS) if exact else []
    return ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled,
    )


def _decode(model, z, view, exact=False) -> tuple[np.ndarray, np.ndarray]:
    """Frame by frame (batch 1), as an engine runs: (texture [T, ...], vertices [T, ...])."""
    session = _session(model, exact)
    outs = [session.run(["texture", "vertices"], {"z": z[i : i + 1], "view": view[i : i + 1]})
            for i in range(len(z))]  # fmt: skip
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _worst_frame_psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    peak = float(reference.max() - reference.min())
    mse = ((candidate.astype(np.float64) - reference) ** 2).reshape(len(reference), -1).mean(1)
    return np.inf if mse.max() == 0 else float(10 * np.log10(peak**2 / mse.max()))


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    path = str(tmp_path / "optimized.onnx")
    _session(model, optimized=path)
    return Counter(
        f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in onnx.load(path).graph.node
    )


# --------------------------------------------------------------------------- phase maths


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


def test_phase_gemm_on_a_channels_last_im2col_is_the_merged_conv():
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (1, 6, 7, 5))  # NHWC, int8 values
    w = rng.integers(-127, 128, (5, 4, 4, 4))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = np.concatenate([padded[:, u : u + 7, v : v + 8] for u in (0, 1) for v in (0, 1)], -1)
    gemm = columns @ phase_gemm_weights(w).astype(np.int64)  # [1, 7, 8, 16]
    merged = F.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)).double(),
        torch.from_numpy(merged_phase_weights(w)).double(),
        padding=1,
    )
    assert np.array_equal(gemm, merged.numpy().transpose(0, 2, 3, 1).astype(np.int64))


def test_phase_weights_only_rearrange_the_values():
    w = np.arange(3 * 2 * 16, dtype=np.int8).reshape(3, 2, 4, 4)
    phases = phase_weights(w)
    assert phases.shape == (4, 2, 3, 2, 2) and phases.dtype == np.int8
    assert sorted(phases.ravel().tolist()) == sorted(w.ravel().tolist())
    assert phase_gemm_weights(w).dtype == np.int8


def test_a_texel_bias_laid_out_like_the_merged_output_lands_on_its_texels():
    rng = np.random.default_rng(3)
    bias = rng.standard_normal((1, 4, 6, 8)).astype(np.float32)  # a layer output 6 x 8
    merged = phases_constant(bias, 4, (3, 4))  # [1, 4, 5, 16]
    image = merged.reshape(1, 4, 5, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(1, 8, 10, 4)
    assert np.array_equal(image[:, 1:7, 1:9].transpose(0, 3, 1, 2), bias)


# --------------------------------------------------------------------------- float graphs


def test_float_graph_rewrite_matches_the_original_to_float_rounding(graphs):
    float_model = graphs["base"][0]
    result = rewrite_for_ort(float_model)
    z, view = smooth_clip(16, 4, seed=7)
    (ref_tex, ref_vert), (tex, vert) = _decode(float_model, z, view), _decode(result.model, z, view)
    assert np.abs(tex - ref_tex).max() <= 1e-6 * (ref_tex.max() - ref_tex.min())
    assert np.abs(vert - ref_vert).max() <= 1e-6 * np.abs(ref_vert).max()
    assert [layer.mode for layer in result.layers] == ["float"] * 4
    assert "ConvTranspose" not in {n.op_type for n in result.model.graph.node}


def test_rewrite_keeps_inputs_outputs_opset_and_ir_version(graphs):
    for model in graphs["base"]:
        rewritten = rewrite_for_ort(model).model
        assert [i.name for i in rewritten.graph.input] == ["z", "view"]
        assert [o.name for o in rewritten.graph.output] == ["texture", "vertices"]
        assert rewritten.ir_version == model.ir_version
        assert {o.domain: o.version for o in model.opset_import}.items() <= {
            o.domain: o.version for o in rewritten.opset_import
        }.items()
        onnx.checker.check_model(rewritten)


def test_float_output_layer_absorbs_the_texture_gain_and_offset(graphs):
    # texture = (deconv + texel bias) * tex_gain + tex_offset: the gain goes into the
    # weights, both additive terms into one Add
    float_model = graphs["base"][0]
    before = Counter(n.op_type for n in float_model.graph.node)
    after = Counter(n.op_type for n in rewrite_for_ort(float_model).model.graph.node)
    assert (before["Mul"] - after["Mul"], before["Add"] - after["Add"]) == (1, 1)
    assert after["Col2Im"] == 4


# --------------------------------------------------------------------------- exact form


def _one_layer_graph(rng, c_in=6, c_out=5, h=4):
    """Q -> DQ -> ConvTranspose(DQ int8 w, per channel) -> Add (texel bias) -> LeakyRelu
    -> Q: one quantized layer as avatarq writes it; output: the 8-bit tensor."""
    init = numpy_helper.from_array
    values = {
        "sx": np.float32(0.0437),
        "zx": np.int8(0),
        "wq": rng.integers(-127, 128, (c_in, c_out, 4, 4)).astype(np.int8),
        "ws": (rng.random(c_out) * 0.01 + 0.003).astype(np.float32),
        "wz": np.zeros(c_out, np.int8),
        "tb": (rng.standard_normal((1, c_out, 2 * h, 2 * h)) * 0.3).astype(np.float32),
        "sy": np.float32(0.0291),
        "zy": np.int8(0),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("ConvTranspose", ["xd", "wd"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y", "tb"], ["b"]),
        helper.make_node("LeakyRelu", ["b"], ["a"], alpha=0.2),
        helper.make_node("QuantizeLinear", ["a", "sy", "zy"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "sy", "zy"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, h])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c_out, 2 * h, 2 * h])],
        [init(np.asarray(v), k) for k, v in values.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    return model, values


def _exact_numpy(x: np.ndarray, v: dict) -> np.ndarray:
    """The one-layer graph by hand: integer sum, then float32 rescale, bias, LeakyReLU, Q."""
    xq = np.clip(np.rint(x / v["sx"]), -128, 127)
    acc = F.conv_transpose2d(
        torch.from_numpy(xq).double(), torch.from_numpy(v["wq"]).double(), stride=2, padding=1
    ).numpy()  # integers, exact in float64
    rescale = (v["sx"] * v["ws"]).astype(np.float32).reshape(1, -1, 1, 1)
    y = acc.astype(np.float32) * rescale + v["tb"]  # float32: one rounding each
    y = np.where(y < 0, y * np.float32(0.2), y)
    return np.clip(np.rint(y / v["sy"]), -128, 127).astype(np.float32) * v["sy"]


def test_exact_form_and_engine_equal_the_integer_sum_rescaled_once_bit_for_bit():
    rng = np.random.default_rng(4)
    model, values = _one_layer_graph(rng)
    x = (rng.standard_normal((1, 6, 4, 4)) * 2).astype(np.float32)
    expected = _exact_numpy(x, values)
    exact, layers = exact_reference(model)
    assert [(layer.op, layer.problem) for layer in layers] == [("ConvTranspose", "")]
    for candidate in (exact, rewrite_for_ort(model).model):
        (out,) = _session(candidate, exact=True).run(["out"], {"x": x})
        assert np.array_equal(out, expected)


def test_exact_reference_leaves_float_graphs_unchanged(graphs):
    float_model = graphs["base"][0]
    exact, layers = exact_reference(float_model)
    assert layers == []
    assert Counter(n.op_type for n in exact.graph.node) == Counter(
        n.op_type for n in float_model.graph.node
    )


@pytest.mark.parametrize("arch", ["base", "res", "non", "bilinear"])
def test_exact_reference_runs_every_quantized_layer_on_integer_valued_floats(graphs, arch):
    exact, layers = exact_reference(graphs[arch][1])
    ops = Counter(n.op_type for n in exact.graph.node)
    assert all(not layer.problem for layer in layers)
    assert ops["Mul"] >= len(layers)  # one rescale per layer
    weights = [i for i in exact.graph.initializer if i.name.endswith(".weight_integers")]
    assert len(weights) == len(layers)
    for init in weights:
        w = numpy_helper.to_array(init)
        assert w.dtype == np.float32 and np.array_equal(w, np.round(w))


# --------------------------------------------------------------------------- INT8 engine


@pytest.mark.parametrize("arch", ["base", "res", "non", "bilinear"])
def test_int8_engine_is_bit_identical_to_the_exact_evaluation(graphs, arch):
    qdq = graphs[arch][1]
    engine = rewrite_for_ort(qdq).model
    z, view = smooth_clip(16, 8, seed=11, sigma=2.0)
    (ref_tex, ref_vert), (tex, vert) = (
        _decode(exact_reference(qdq)[0], z, view, exact=True),
        _decode(engine, z, view),
    )
    assert np.array_equal(vert, ref_vert)
    assert _worst_frame_psnr(ref_tex, tex) >= 130.0  # the output layer: ulp-level only
    assert np.mean(tex != ref_tex) < 0.5


@pytest.mark.parametrize("arch", ["base", "res", "non", "bilinear"])
def test_int8_engine_holds_integer_kernels_after_onnxruntime_optimization(graphs, arch, tmp_path):
    qdq = graphs[arch][1]
    result = rewrite_for_ort(qdq)
    ops = _optimized_ops(result.model, tmp_path)
    assert ops["com.microsoft.MatMulIntegerToFloat"] == len(result.layers)
    for float_op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm"):
        assert ops[float_op] == 0, float_op
    assert ops["DequantizeLinear"] == 0  # nothing runs on dequantized weights
    assert [layer.mode for layer in result.layers] == ["int8"] * len(result.layers)


def test_int8_engine_stores_weights_as_int8(graphs):
    result = rewrite_for_ort(graphs["base"][1])
    weights = [i for i in result.model.graph.initializer if i.name.endswith(".weight_int8")]
    assert len(weights) == len(result.layers)
    assert {numpy_helper.to_array(i).dtype for i in weights} == {np.dtype(np.int8)}
    large_float = [
        i.name
        for i in result.model.graph.initializer
        if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 4096
    ]
    assert all(".bias" in name or "offset" in name for name in large_float)  # texel biases


def test_int8_layers_pass_8bit_channels_last_data_between_them(graphs):
    model = onnx.shape_inference.infer_shapes(rewrite_for_ort(graphs["base"][1]).model)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert {types.get(n.input[0]) for n in gemms} == {TensorProto.UINT8}
    blocks = [n for n in model.graph.node if n.op_type == "Transpose" and n.attribute and
              list(n.attribute[0].ints) == [0, 1, 3, 2, 4, 5]]  # fmt: skip
    assert len(blocks) == 3  # one 8-bit interleave per hidden ConvTranspose
    assert {types[n.output[0]] for n in blocks} == {TensorProto.UINT8}


def test_layer_plan_names_each_layer_and_how_it_ends(graphs):
    layers = rewrite_for_ort(graphs["base"][1]).layers
    assert [layer.node for layer in layers][:3] == ["dec.view_fc", "dec.z_fc", "dec.texture_fc"]
    output = next(
        layer for layer in layers if layer.node == "dec.texture_decoder.upsample.1.conv2.deconv"
    )
    assert (output.mode, output.kernel) == ("int8", "MatMulIntegerToFloat")
    assert output.reason == "output layer: float tail folded in, Col2Im"


def test_a_layer_listed_as_float_runs_its_exact_form_on_float_kernels(graphs):
    qdq = graphs["base"][1]
    name = "dec.texture_decoder.upsample.0.conv2.deconv"
    result = rewrite_for_ort(qdq, OrtRewriteConfig(float_layers=(name,)))
    layer = next(layer for layer in result.layers if layer.node == name)
    assert (layer.mode, layer.kernel, layer.reason) == ("float", "Conv", "listed in float_layers")
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert (ops["ConvTranspose"], ops["Col2Im"]) == (0, 2)  # its phase conv + the output layer
    z, view = smooth_clip(16, 4, seed=12)
    ref = _decode(exact_reference(qdq)[0], z, view, exact=True)[0]
    assert _worst_frame_psnr(ref, _decode(result.model, z, view)[0]) >= 130.0


def _quantize_static(float_model, tmp_path, activation) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static of the float graph with avatarq's placement (Q/DQ on
    the inputs of ConvTranspose/Gemm, per-channel int8 weights, float biases)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    z, view = smooth_clip(16, 8, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"z": z[i : i + 1], "view": view[i : i + 1]} for i in range(8)])

        def get_next(self):
            return next(self.items, None)

    onnx.save(float_model, tmp_path / "float.onnx")
    quantize_static(
        str(tmp_path / "float.onnx"),
        str(tmp_path / "qdq.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=activation,
        op_types_to_quantize=["ConvTranspose", "Gemm"],
        extra_options={
            "ActivationSymmetric": activation.name == "QInt8",
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["ConvTranspose", "Gemm"],
        },
    )
    return onnx.load(str(tmp_path / "qdq.onnx"))


@pytest.mark.parametrize("activation", ["QInt8", "QUInt8"])
def test_onnxruntime_quantize_static_graphs_get_the_same_exact_engine(graphs, tmp_path, activation):
    from onnxruntime.quantization import QuantType

    qdq = _quantize_static(graphs["base"][0], tmp_path, QuantType[activation])
    result = rewrite_for_ort(qdq)
    assert result.n_int8 == 8
    z, view = smooth_clip(16, 4, seed=13)
    ref = _decode(exact_reference(qdq)[0], z, view, exact=True)[0]
    assert _worst_frame_psnr(ref, _decode(result.model, z, view)[0]) >= 130.0


def test_a_plain_qdq_conv_transpose_runs_in_float_in_onnxruntime(graphs, tmp_path):
    # Why the rewrite exists: ORT has no integer ConvTranspose, the Q/DQ stay around a float op.
    ops = _optimized_ops(graphs["base"][1], tmp_path)
    assert ops["ConvTranspose"] == 4
    assert ops["QLinearConv"] == 0


def test_per_channel_gain_texel_bias_and_clip_tail_is_reproduced_exactly():
    rng = np.random.default_rng(5)
    model, values = _one_layer_graph(rng, c_in=4, c_out=8, h=5)
    graph = model.graph
    # insert a per-channel gain Mul and a Clip between the texel bias and the LeakyRelu
    graph.initializer.extend(
        [
            numpy_helper.from_array((rng.random((1, 8, 1, 1)) + 0.5).astype(np.float32), "gain"),
            numpy_helper.from_array(np.float32(-1.0), "lo"),
            numpy_helper.from_array(np.float32(1.5), "hi"),
        ]
    )
    add = next(n for n in graph.node if n.op_type == "Add")
    leaky = next(n for n in graph.node if n.op_type == "LeakyRelu")
    add.output[0] = "b0"
    at = list(graph.node).index(add) + 1
    graph.node.insert(at, helper.make_node("Mul", ["gain", "b0"], ["g"]))
    graph.node.insert(at + 1, helper.make_node("Clip", ["g", "lo", "hi"], ["b"]))
    assert leaky.input[0] == "b"
    x = (rng.standard_normal((1, 4, 5, 5)) * 2).astype(np.float32)
    (ref,) = _session(exact_reference(model)[0], exact=True).run(["out"], {"x": x})
    (out,) = _session(rewrite_for_ort(model).model).run(["out"], {"x": x})
    assert np.array_equal(out, ref)


def test_conv_transpose_that_is_not_k4_s2_p1_is_left_as_it_is():
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
    model.ir_version = 10
    result = rewrite_for_ort(model)
    assert [(layer.node, layer.mode, layer.reason) for layer in result.layers] == [
        ("up", "kept", "strides [1, 1]")
    ]
    assert [n.op_type for n in result.model.graph.node] == ["ConvTranspose"]


def test_a_layer_whose_sum_can_leave_float32_integers_is_kept_in_both_forms():
    rng = np.random.default_rng(6)
    model, _ = _one_layer_graph(rng, c_in=300, c_out=2, h=2)  # 4 x 300 taps x 128 x 127 > 2^24
    weights = next(i for i in model.graph.initializer if i.name == "wq")
    weights.CopyFrom(numpy_helper.from_array(np.full((300, 2, 4, 4), 127, np.int8), "wq"))
    exact, layers = exact_reference(model)
    assert layers[0].problem == f"its accumulator can reach {4 * 300 * 127 * 128} >= 2^24"
    result = rewrite_for_ort(model)
    assert [(layer.mode, layer.reason) for layer in result.layers] == [("kept", layers[0].problem)]
    x = rng.standard_normal((1, 300, 2, 2)).astype(np.float32)
    (ref,), (out,) = (_session(m).run(["out"], {"x": x}) for m in (exact, result.model))
    assert np.array_equal(out, ref)


def test_rewrite_config_round_trips_through_json():
    import json

    config = OrtRewriteConfig(float_layers=("dec.a", "dec.b"))
    assert OrtRewriteConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 2}, "ORT rewrite config version 2 is not supported"),
        ({"float_layers": "dec.a"}, "float_layers must be a list of layer names"),
    ],
)
def test_rewrite_config_rejects_bad_values(kwargs, message):
    with pytest.raises(AvatarqError, match=message):
        OrtRewriteConfig(**kwargs)


def test_unknown_rewrite_options_are_refused():
    with pytest.raises(AvatarqError, match=r"unknown ORT rewrite option\(s\) \['speed'\]"):
        OrtRewriteConfig.from_dict({"speed": 2})
