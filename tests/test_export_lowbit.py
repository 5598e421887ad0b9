"""Low-bit Q/DQ graphs: packed INT4 weights, block scales, FP8, rotations, smoothing, texel
bias storage; every one runs in ONNX Runtime and agrees with the torch fake-quant model.

Tolerance: the graph and `FakeQuantDecoder` round the same float32 numbers, so they agree
to float summation order; a value that lands on a rounding boundary of the next quantizer
may move one step. On the tiny decoder the texture and vertices agree to 1e-5 (absolute,
outputs of magnitude ~1) in every format below.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from avatarq.calibration import CalibrationArtifact, CalibrationConfig, calibrate
from avatarq.export import export_onnx
from avatarq.export.qdq import quantize_onnx, validate_qdq
from avatarq.export.storage import describe_storage, initializer_bytes
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder
from tiny_dam import tiny_calibration_decoder, tiny_calibration_samples

FAST = {"iters": 3, "crop": 8, "sensitivity": "none"}
DECONV = "dec.texture_decoder.upsample.0.conv1.deconv"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny():
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    return decoder, samples, export_onnx(decoder)


def _quantize(tiny, **kwargs):
    decoder, samples, fp = tiny
    artifact = calibrate(decoder, samples, CalibrationConfig(**FAST, **kwargs))
    model = quantize_onnx(fp, artifact)
    onnx.checker.check_model(model, full_check=True)
    return artifact, model


def _agrees(tiny, artifact, model, tmp_path, texture_scale=1.0):
    """``texture_scale``: the texture's magnitude (the tolerance is absolute for outputs of
    magnitude ~1; float32 rounding grows with the value)."""
    decoder, samples, _ = tiny
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    vs_fakequant, vs_fp32 = validate_qdq(path, decoder, artifact, samples.inputs)
    assert vs_fakequant.texture_max_abs_error < TOLERANCE * texture_scale
    assert vs_fakequant.vertices_max_abs_error < TOLERANCE
    return vs_fp32


def _inits(model):
    return {i.name: i for i in model.graph.initializer}


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def test_w4a8_weights_are_packed_int4_two_per_byte(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="w4a8")
    inits = _inits(model)
    for layer in artifact.layers:
        q = inits[f"{layer.name}.weight_quantized"]
        n = int(np.prod(q.dims))
        assert q.data_type == TensorProto.INT4
        assert len(q.raw_data) == (n + 1) // 2
        dq = _node(model, f"{layer.name}/weight_DQ")
        assert len(dq.input) == 2  # no zero point: symmetric
    assert model.ir_version == 10
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    _agrees(tiny, artifact, model, tmp_path)


def test_w4a8_graph_stores_about_half_the_w8a8_weight_bytes(tiny):
    _, w8 = _quantize(tiny, bits="w8a8")
    _, w4 = _quantize(tiny, bits="w4a8")
    _, s8 = describe_storage(w8)
    storage, s4 = describe_storage(w4)
    assert s4["layer_weights"] < 0.62 * s8["layer_weights"]
    assert storage["dec.mesh_fc"].weight == "int4"
    assert storage["dec.mesh_fc"].scales == "per-channel"
    assert storage["dec.mesh_fc"].activation == "int8"


def test_block_scales_write_a_blocked_dequantizelinear(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="w4a8", weight_block=4)
    dq = _node(model, f"{DECONV}/weight_DQ")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 4}  # ConvTranspose: input channels on axis 0
    scale = numpy_helper.to_array(_inits(model)[dq.input[1]])
    assert scale.shape == (2, 8, 4, 4)  # [ceil(8 / 4), Cout, kH, kW]
    _agrees(tiny, artifact, model, tmp_path)


def test_fp8_writes_float8_weights_and_activation_qdq(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="fp8")
    inits = _inits(model)
    q = _node(model, f"{DECONV}/Q")
    assert inits[q.input[2]].data_type == TensorProto.FLOAT8E4M3FN
    assert inits[f"{DECONV}.weight_quantized"].data_type == TensorProto.FLOAT8E4M3FN
    assert [o.version for o in model.opset_import if o.domain == ""] == [19]
    vs_fp32 = _agrees(tiny, artifact, model, tmp_path)
    assert 35 < vs_fp32.image.psnr_all < 120


def test_4_bit_activations_clip_to_16_levels_inside_int8(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="w4a4")
    clip = _node(model, f"{DECONV}/Clip")
    inits = _inits(model)
    s = np.float32(artifact[DECONV].input_scale)
    assert float(numpy_helper.to_array(inits[clip.input[1]])) == np.float32(-8 * s)
    assert float(numpy_helper.to_array(inits[clip.input[2]])) == np.float32(7 * s)
    assert describe_storage(model)[0][DECONV].activation == "int4 (in int8)"
    _agrees(tiny, artifact, model, tmp_path)


def test_gptq_integers_are_the_graphs_integers(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="w4a8", gptq=True)
    codes = numpy_helper.to_array(_inits(model)[f"{DECONV}.weight_quantized"])
    assert np.array_equal(codes.astype(np.int8), artifact[DECONV].weight_int)
    _agrees(tiny, artifact, model, tmp_path)


def test_rotated_layers_rotate_their_input_before_the_quantizer(tiny, tmp_path):
    artifact, model = _quantize(tiny, bits="w4a8", hadamard=True)
    rotate = _node(model, f"{DECONV}/Rotate")
    assert rotate.op_type == "Conv"
    q = _node(model, f"{DECONV}/Q")
    assert q.input[0] == rotate.output[0]
    assert _node(model, "dec.mesh_fc/Rotate").op_type == "MatMul"
    texture_fc = numpy_helper.to_array(_inits(model)["dec.texture_fc.weight_quantized"])
    assert texture_fc.shape == (128, 512)  # 264 inputs padded to 512
    assert describe_storage(model)[0][DECONV].rotated
    _agrees(tiny, artifact, model, tmp_path)


def test_smoothing_is_folded_into_the_graphs_float_initializers(tiny, tmp_path):
    _, _, fp = tiny
    artifact, model = _quantize(tiny, bits="w6a6", smooth=True)
    before = numpy_helper.to_array(_inits(fp)["dec.texture_decoder.upsample.0.conv1.bias"])
    after = numpy_helper.to_array(_inits(model)["dec.texture_decoder.upsample.0.conv1.bias"])
    s = artifact.smoothing_scales["dec.texture_decoder.upsample.0.conv2.deconv"]
    assert np.allclose(after, before / s.reshape(1, -1, 1, 1), rtol=1e-6)
    _agrees(tiny, artifact, model, tmp_path)


@pytest.mark.parametrize(
    "fmt, dtype",
    [("fp16", TensorProto.FLOAT16), ("int8", TensorProto.INT8), ("int4", TensorProto.INT4)],
)
def test_texel_biases_take_their_storage_format(tiny, tmp_path, fmt, dtype):
    artifact, model = _quantize(tiny, bits="w8a8", bias_format=fmt)
    inits = _inits(model)
    name = "dec.texture_decoder.upsample.0.conv2.bias"
    assert name not in inits
    stored = next(i for n, i in inits.items() if n.startswith(name + "."))
    assert stored.data_type == dtype
    _, sizes = describe_storage(model)
    _, fp32_sizes = describe_storage(
        quantize_onnx(tiny[2], calibrate(tiny[0], tiny[1], CalibrationConfig(**FAST)))
    )
    # int4 keeps a float32 scale per row of these tiny (<= 16 texel) rows: 4 bytes per row
    bound = {"fp16": 0.55, "int8": 0.3, "int4": 0.25}[fmt]
    assert sizes["texel_biases"] < bound * fp32_sizes["texel_biases"]
    _agrees(tiny, artifact, model, tmp_path)


def test_int4_biases_store_the_mean_texture_offset_in_uint8_blocks(tmp_path):
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    ramp = torch.linspace(20.0, 230.0, 16).view(1, 1, 1, 16) + torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        decoder.tex_offset.copy_(ramp.expand(1, 3, 16, 16))
    tiny = (decoder, samples, export_onnx(decoder))
    artifact, model = _quantize(tiny, bits="w4a8", bias_format="int4")
    inits = _inits(model)
    assert artifact.texel_biases["tex_offset"] == "uint8-blocks"
    assert "tex_offset" not in inits
    codes = inits["tex_offset.codes"]
    assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == [1, 3, 16, 1, 16]
    assert list(inits["tex_offset.block_scale"].dims) == [1, 3, 16, 1, 1]
    vs_fp32 = _agrees(tiny, artifact, model, tmp_path, texture_scale=256.0)
    # 8-bit codes over each 16-texel block: the offset moves by at most half a step
    # (range / 255 / 2 < 0.3 here), far below the 4-bit weights' error
    assert vs_fp32.texture_max_abs_error < 30.0


def test_a_mixed_plan_of_every_format_runs(tiny, tmp_path):
    precision = {
        "dec.view_fc": "fp32",
        "dec.z_fc": "w8a8",
        "dec.texture_fc": "fp8",
        DECONV: "w4a4",
        "dec.texture_decoder.upsample.0.conv2.deconv": "fp16",
        "dec.mesh_fc": "w4a8",
    }
    artifact, model = _quantize(tiny, bits="w8a8", precision=precision)
    storage, _ = describe_storage(model)
    assert storage["dec.texture_fc"].weight == "float8e4m3fn"
    assert storage["dec.texture_decoder.upsample.0.conv2.deconv"].activation == "float16"
    decoder, samples, _ = tiny
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    vs_fakequant, _ = validate_qdq(path, decoder, artifact, samples.inputs)
    # the fp16 layer: ONNX Runtime's float16 convolution sums in another order than torch
    assert vs_fakequant.texture_max_abs_error < 1e-3
    assert vs_fakequant.vertices_max_abs_error < TOLERANCE


def test_same_low_bit_calibration_gives_identical_bytes(tiny):
    decoder, samples, fp = tiny
    artifact = calibrate(
        decoder, samples, CalibrationConfig(**FAST, bits="w4a8", gptq=True, weight_block=4)
    )
    assert (
        quantize_onnx(fp, artifact).SerializeToString()
        == quantize_onnx(fp, artifact).SerializeToString()
    )


def test_a_version_1_artifact_loads_as_wNaN_and_exports_the_same_graph(tiny, tmp_path):
    decoder, samples, fp = tiny
    artifact = calibrate(decoder, samples, CalibrationConfig(**FAST, bits=6))
    artifact.save(tmp_path / "v2")
    doc = json.loads((tmp_path / "v2" / "calib.json").read_text())
    doc["version"] = 1
    doc["bits"] = doc["config"]["bits"] = 6
    for key in ("smoothing", "texel_biases", "allocation"):
        doc.pop(key)
    for layer in doc["layers"]:
        layer["precision"] = "int8" if layer["precision"] == "w6a6" else layer["precision"]
        layer["bits"] = 6
        for key in ("weight_bits", "act_bits", "weight_block", "rotation"):
            layer.pop(key)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "calib.json").write_text(json.dumps(doc))
    (tmp_path / "v1" / "tensors.npz").write_bytes((tmp_path / "v2" / "tensors.npz").read_bytes())
    old = CalibrationArtifact.load(tmp_path / "v1", decoder)
    assert set(old.precision.values()) == {"w6a6"} and old.config["bits"] == "w6a6"
    assert quantize_onnx(fp, old).graph == quantize_onnx(fp, artifact).graph


def test_warp_decoders_get_opset_21_with_gridsample_modes_renamed(tmp_path):
    import torch

    torch.manual_seed(0)
    model = DeepAppearanceModel(
        DAMConfig(arch="warp", z_dim=8, tex_size=16, n_vertices=10, n_cams=1)
    )
    decoder = DeployableDecoder(model)
    samples = tiny_calibration_samples(4)
    artifact = calibrate(decoder, samples, CalibrationConfig(**FAST, bits="w4a8"))
    graph = quantize_onnx(export_onnx(decoder), artifact)
    onnx.checker.check_model(graph, full_check=True)
    grid = next(n for n in graph.graph.node if n.op_type == "GridSample")
    assert {a.name: a.s for a in grid.attribute}["mode"] == b"linear"
    path = tmp_path / "warp.onnx"
    onnx.save(graph, path)
    vs_fakequant, _ = validate_qdq(path, decoder, artifact, samples.inputs)
    assert vs_fakequant.texture_max_abs_error < TOLERANCE


def test_initializer_bytes_count_int4_as_half_bytes():
    t = onnx.helper.make_tensor("q", TensorProto.INT4, [3, 5], np.zeros(15, np.int8).tolist())
    assert initializer_bytes(t) == 8
