"""Q/DQ insertion: TensorRT placement on the exported graph, FP16 casts, determinism, ORT
agreement with the torch fake-quant model."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from avatarq.calibration import CalibrationConfig, CalibrationSamples, calibrate
from avatarq.errors import AvatarqError
from avatarq.export import export_onnx
from avatarq.export.onnx_export import layer_nodes
from avatarq.export.qdq import QDQConfig, fakequant_gate_db, quantize_onnx, validate_qdq
from avatarq.models import DeployableDecoder
from tiny_dam import tiny_calibration_decoder, tiny_calibration_samples

FAST = CalibrationConfig(iters=5, crop=8, sensitivity="none")
DECONV = "dec.texture_decoder.upsample.0.conv2.deconv"


def tiny_decoder(seed: int = 0) -> DeployableDecoder:
    return tiny_calibration_decoder(seed)


def tiny_samples(n: int = 8) -> CalibrationSamples:
    return tiny_calibration_samples(n)


@pytest.fixture(scope="module")
def setup():
    decoder, samples = tiny_decoder(), tiny_samples()
    return decoder, samples, export_onnx(decoder), calibrate(decoder, samples, FAST)


class Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_every_int8_layer_has_per_tensor_input_qdq_and_per_channel_int8_weights(setup):
    _, _, fp, artifact = setup
    model = quantize_onnx(fp, artifact)
    onnx.checker.check_model(model, full_check=True)
    g = Graph(model)
    nodes = layer_nodes(fp)
    by_name = {n.name: n for n in model.graph.node}
    for layer in artifact.layers:
        node = by_name[nodes[layer.name].name]
        dq = g.producer[node.input[0]]
        q = g.producer[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
        scale, zp = g.inits[q.input[1]], g.inits[q.input[2]]
        assert scale.shape == () and scale.dtype == np.float32
        assert float(scale) == np.float32(layer.input_scale)
        assert zp.dtype == np.int8 and int(zp) == 0
        w_dq = g.producer[node.input[1]]
        assert w_dq.op_type == "DequantizeLinear"
        w_q, w_scale = g.inits[w_dq.input[0]], g.inits[w_dq.input[1]]
        assert w_q.dtype == np.int8 and w_q.shape == layer.weight_shape
        axis = {a.name: a.i for a in w_dq.attribute}["axis"]
        assert axis == (1 if node.op_type == "ConvTranspose" else 0)
        assert np.array_equal(w_scale, layer.weight_scale)
        # nothing quantizes the layer's output
        assert all(c.op_type != "QuantizeLinear" for c in g.consumers.get(node.output[0], []))


def test_texel_biases_stay_float_and_float_weights_are_gone(setup):
    _, _, fp, artifact = setup
    model = quantize_onnx(fp, artifact)
    g = Graph(model)
    assert g.inits[f"{DECONV[: -len('.deconv')]}.bias"].dtype == np.float32
    assert f"{DECONV}.weight" not in g.inits
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)
    assert model.ir_version == 10
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]


def test_fp16_layers_are_float16_between_casts(setup):
    decoder, samples, fp, _ = setup
    config = CalibrationConfig(iters=2, crop=8, sensitivity="none", precision={DECONV: "fp16"})
    model = quantize_onnx(fp, calibrate(decoder, samples, config))
    g = Graph(model)
    node = next(n for n in model.graph.node if n.name == layer_nodes(fp)[DECONV].name)
    cast_in = g.producer[node.input[0]]
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT16
    assert g.inits[node.input[1]].dtype == np.float16
    (cast_out,) = g.consumers[node.output[0]]
    assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == TensorProto.FLOAT


def test_6_bit_activations_are_clipped_before_quantizelinear(setup):
    decoder, samples, fp, _ = setup
    artifact = calibrate(
        decoder, samples, CalibrationConfig(iters=2, crop=8, bits=6, sensitivity="none")
    )
    g = Graph(quantize_onnx(fp, artifact))
    q = next(n for n in g.model.graph.node if n.name == f"{DECONV}/Q")
    clip = g.producer[q.input[0]]
    assert clip.op_type == "Clip"
    s = np.float32(artifact[DECONV].input_scale)
    assert float(g.inits[clip.input[1]]) == np.float32(-32 * s)
    assert float(g.inits[clip.input[2]]) == np.float32(31 * s)
    assert np.abs(g.inits[f"{DECONV}.weight_quantized"]).max() <= 31


def test_conv_transpose_weights_can_be_per_tensor(setup):
    _, _, fp, artifact = setup
    g = Graph(quantize_onnx(fp, artifact, QDQConfig(conv_transpose_axis=None)))
    dq = next(n for n in g.model.graph.node if n.name == f"{DECONV}/weight_DQ")
    assert g.inits[dq.input[1]].shape == () and not dq.attribute


def test_same_graph_and_artifact_give_identical_bytes(setup):
    _, _, fp, artifact = setup
    assert (
        quantize_onnx(fp, artifact).SerializeToString()
        == quantize_onnx(fp, artifact).SerializeToString()
    )


@pytest.mark.parametrize("axis", [1, 0, None], ids=["axis1", "axis0", "per_tensor"])
def test_onnx_runtime_agrees_with_the_fake_quant_decoder(setup, tmp_path, axis):
    decoder, samples, fp, artifact = setup
    config = QDQConfig(conv_transpose_axis=axis)
    path = tmp_path / "q.onnx"
    onnx.save(quantize_onnx(fp, artifact, config), path)
    vs_fakequant, vs_fp32 = validate_qdq(path, decoder, artifact, samples.inputs, config)
    assert vs_fakequant.texture_max_abs_error < 1e-5
    assert vs_fakequant.vertices_max_abs_error < 1e-5
    assert 40 < vs_fp32.image.psnr_all < 120  # quantized, but close
    assert bool(vs_fakequant)


def test_the_fakequant_gate_is_60_db_or_20_db_above_the_quantization_error():
    assert fakequant_gate_db(83.4) == 60.0
    assert fakequant_gate_db(32.0) == 52.0


def test_a_graph_with_other_scales_than_the_calibration_fails_validation(setup, tmp_path):
    decoder, samples, fp, artifact = setup
    path = tmp_path / "q.onnx"
    onnx.save(quantize_onnx(fp, artifact), path)
    other = copy.deepcopy(artifact)
    for layer in other.layers:  # the graph's activation grids are 16x finer
        layer.input_scale *= 16
    vs_fakequant, vs_fp32 = validate_qdq(path, decoder, other, samples.inputs)
    assert not vs_fakequant
    gate = fakequant_gate_db(vs_fp32.image.psnr_all)
    assert vs_fakequant.tolerances.min_psnr_all == gate


def test_a_layer_missing_from_the_calibration_is_named(setup):
    _, _, fp, artifact = setup
    artifact.layers, kept = (
        [layer for layer in artifact.layers if layer.name != DECONV],
        artifact.layers,
    )
    try:
        with pytest.raises(AvatarqError, match=f"missing layer '{DECONV}'"):
            quantize_onnx(fp, artifact)
    finally:
        artifact.layers = kept


def test_ir_version_above_10_is_refused():
    with pytest.raises(AvatarqError, match="ir_version"):
        QDQConfig(ir_version=11)
