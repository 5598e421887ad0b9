"""Insert the calibration's precision plan into the float ONNX graph: Q/DQ nodes and casts.

TensorRT 11 is strongly typed, so the graph IS the precision plan (deploy.md). Per layer
(Conv, ConvTranspose, Gemm, MatMul), by its format (`avatarq.calibration.formats`):

- ``wXaY``: the data input goes through a per-tensor ``QuantizeLinear -> DequantizeLinear``
  (scale float32 scalar, zero point int8 0; uint8 with a zero point for asymmetric
  calibrations, an ONNX Runtime-only form); Y < 8 clips the activation to the Y-bit grid
  first (``Clip``), inside the 8-bit container. The weight initializer becomes integer
  codes behind a ``DequantizeLinear``: INT8 (X = 5..8, with an int8 zero point of zeros)
  or packed INT4 (X <= 4, two codes per byte, no zero point), per output channel (axis 0
  for Conv/Gemm weights, 1 for ConvTranspose weights [Cin, Cout, kH, kW]; the ConvTranspose
  axis is a parameter because TensorRT versions disagree about it) or in blocks of input
  channels (``axis`` = the input-channel axis, ``block_size``).
- ``fp8``: the same with FLOAT8E4M3FN: activation Q/DQ with a float8 zero point 0, weights
  stored as FP8 with per-output-channel scales.
- a rotated layer (Hadamard): before its input Q/DQ, x' = R x in float (a MatMul with R^T
  for Gemm/MatMul, a 1x1 Conv with R for Conv/ConvTranspose); its weight codes belong to
  the rotated weight, which has n >= Cin input channels.
- ``fp16``: ``Cast`` to float16 on the data input, float16 weight and bias, ``Cast`` back.
- ``fp32``: unchanged.

Before that, smoothing scales are folded into the float initializers they change
(`CalibrationArtifact.smoothed_arrays`), and texel biases and the mean-texture offset take
their storage format (`avatarq.calibration.biases`): float16 + Cast, int8 + per-channel
DequantizeLinear (axis 1), INT4 + blocked DequantizeLinear (axis 3), uint8 offset blocks.

Nothing is quantized on outputs; activations stay float32. Graph inputs and outputs stay
float32. The opset becomes 21 when INT4 or blocked scales need it (GridSample's mode
names are updated; graphs with other ops whose meaning changed after 19 are refused), and
the IR version is set explicitly (10: INT4 needs it and ONNX Runtime 1.2x-1.3x loads it).
The same graph and artifact always give the same bytes. `avatarq.calibration.
FakeQuantDecoder` computes what this graph computes. Graph edits use onnx-ir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from torch import nn

from avatarq.calibration.artifact import CalibrationArtifact, LayerCalibration
from avatarq.calibration.biases import OFFSET_NAMES, quantize_bias, quantize_offset, row_block
from avatarq.calibration.quantizers import FloatGrid, activation_range
from avatarq.core.inputs import DecoderInputs
from avatarq.errors import AvatarqError, InternalError
from avatarq.export.ir_graph import GraphBuilder
from avatarq.export.onnx_export import layer_nodes
from avatarq.export.validate import validate_against_torch
from avatarq.measure import Comparison, Tolerances

QDQ_VERSION = 2
MIN_OPSET = 19
INT4_OPSET = 21  # INT4 tensors and blocked DequantizeLinear
MAX_IR_VERSION = 10
CONV_TRANSPOSE_AXES = (1, 0, None)
# Ops whose meaning changed between opset 19 and 21 (GridSample is converted).
_CHANGED_AFTER_19 = ("DFT", "GroupNormalization")
_STORAGE = {
    "int4": (ml_dtypes.int4, ir.DataType.INT4),
    "int8": (np.int8, ir.DataType.INT8),
    "float8e4m3fn": (ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN),
}


@dataclass(frozen=True)
class QDQConfig:
    """How the plan is written into the graph.

    Attributes:
        conv_transpose_axis: weight-scale axis of ConvTranspose layers: 1 (per output
            channel, what avatarq calibrates), 0 (per input channel) or None (per tensor).
            0 and None re-quantize the weights from their float values (max calibration
            along the chosen axis): a fallback for TensorRT versions that reject axis 1.
        ir_version: the ONNX IR version written (10 so that INT4 is legal and ONNX Runtime
            loads it).
    """

    conv_transpose_axis: int | None = 1
    ir_version: int = MAX_IR_VERSION

    def __post_init__(self) -> None:
        if self.conv_transpose_axis not in CONV_TRANSPOSE_AXES:
            raise AvatarqError(
                f"conv_transpose_axis must be 1, 0 or None (per tensor), got "
                f"{self.conv_transpose_axis!r}"
            )
        if not 9 <= self.ir_version <= MAX_IR_VERSION:
            raise AvatarqError(
                f"ir_version must lie in 9..{MAX_IR_VERSION} (opset 19 needs >= 9; ONNX "
                f"Runtime loads <= {MAX_IR_VERSION}), got {self.ir_version}"
            )


class _Builder(GraphBuilder):
    """Unique names, registered initializers and named nodes in one onnx-ir graph."""

    def node(self, op: str, inputs: list[ir.Value | None], base: str, out: str, **attrs) -> ir.Node:
        node = ir.node(op, inputs, attrs or None, name=self.unique(base))
        node.outputs[0].name = self.unique(out)
        return node

    def array(self, name: str) -> np.ndarray:
        value = self.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise AvatarqError(f"layer weight {name!r} is not an initializer of the graph")
        return value.const_value.numpy()


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise AvatarqError("the ONNX graph imports no default-domain opset")


def _activation_nodes(
    b: _Builder, layer: LayerCalibration, source: ir.Value, conv: bool
) -> tuple[list[ir.Node], ir.Value]:
    """[rotation] -> [Clip] -> QuantizeLinear -> DequantizeLinear of ``source``."""
    base = layer.name
    nodes: list[ir.Node] = []
    x = source
    rotation = layer.rotation_matrix()
    if rotation is not None:
        # the entries are +-1/sqrt(n): stored as int8 signs times one float32 scale, which
        # DequantizeLinear turns into exactly the float32 matrix the fake-quant model uses
        r = rotation.numpy().astype(np.float32)
        signs = np.sign(r).astype(np.int8)
        signs = signs[:, :, None, None] if conv else np.ascontiguousarray(signs.T)
        q = b.const(f"{base}.input_rotation", np.ascontiguousarray(signs))
        s = b.const(f"{base}.input_rotation_scale", np.float32(np.abs(r).max()))
        dq = b.node("DequantizeLinear", [q, s], f"{base}/Rotation_DQ", f"{base}.rotation")
        rot = b.node(
            "Conv" if conv else "MatMul",
            [x, dq.outputs[0]],
            f"{base}/Rotate",
            f"{base}.input_rotated",
        )
        nodes += [dq, rot]
        x = rot.outputs[0]
    fmt = layer.format
    grid = activation_range(fmt.act_grid, layer.symmetric)
    scale = np.float32(layer.input_scale)
    s = b.const(f"{base}.input_scale", np.asarray(scale, np.float32))
    if isinstance(grid, FloatGrid):
        zp = b.const(
            f"{base}.input_zero_point",
            np.asarray(0, ml_dtypes.float8_e4m3fn),
            ir.DataType.FLOAT8E4M3FN,
        )
    else:
        zp_type = np.int8 if layer.symmetric else np.uint8
        zp_value = int(layer.input_zero_point or 0)
        zp = b.const(f"{base}.input_zero_point", np.asarray(zp_value, zp_type))
        full = np.iinfo(zp_type)
        if grid.qmin > full.min or grid.qmax < full.max:
            lo = b.const(f"{base}.input_clip_min", np.float32((grid.qmin - zp_value) * scale))
            hi = b.const(f"{base}.input_clip_max", np.float32((grid.qmax - zp_value) * scale))
            nodes.append(b.node("Clip", [x, lo, hi], f"{base}/Clip", f"{base}.input_clipped"))
            x = nodes[-1].outputs[0]
    nodes.append(b.node("QuantizeLinear", [x, s, zp], f"{base}/Q", f"{base}.input_quantized"))
    q = nodes[-1].outputs[0]
    nodes.append(b.node("DequantizeLinear", [q, s, zp], f"{base}/DQ", f"{base}.input_dequantized"))
    return nodes, nodes[-1].outputs[0]


def _weight_nodes(
    b: _Builder, layer: LayerCalibration, weight_name: str, config: QDQConfig
) -> tuple[list[ir.Node], ir.Value]:
    weight = b.array(weight_name)
    if weight.dtype != np.float32:
        raise AvatarqError(
            f"Q/DQ insertion needs the float32 export; {weight_name!r} is {weight.dtype}"
        )
    if tuple(weight.shape) != tuple(layer.weight_shape):
        raise AvatarqError(
            f"layer {layer.name!r}: graph weight {list(weight.shape)}, calibration "
            f"{list(layer.weight_shape)}; the calibration is for another model"
        )
    g = layer.graph_weight(weight, config.conv_transpose_axis)
    np_type, ir_type = _STORAGE[g.container]
    base = layer.name
    q = b.const(f"{base}.weight_quantized", np.asarray(g.codes).astype(np_type), ir_type)
    s = b.const(f"{base}.weight_scale", g.scale)
    inputs: list[ir.Value | None] = [q, s]
    if g.container == "int8":
        inputs.append(b.const(f"{base}.weight_zero_point", np.zeros(g.scale.shape, np.int8)))
    attrs = {} if g.axis is None else {"axis": int(g.axis)}
    if g.block:
        attrs["block_size"] = int(g.block)
    node = b.node(
        "DequantizeLinear", inputs, f"{base}/weight_DQ", f"{base}.weight_dequantized", **attrs
    )
    return [node], node.outputs[0]


def _fp16_layer(b: _Builder, node: ir.Node, name: str) -> None:
    """Cast in -> float16 weight and bias -> Cast out, around ``node``."""
    cast_in = b.node(
        "Cast", [node.inputs[0]], f"{name}/Cast_in", f"{name}.input_fp16", to=ir.DataType.FLOAT16
    )
    b.graph.insert_before(node, cast_in)
    node.replace_input_with(0, cast_in.outputs[0])
    for i in range(1, len(node.inputs)):
        value = node.inputs[i]
        if value is not None:
            node.replace_input_with(
                i, b.const(f"{value.name}.fp16", b.array(value.name).astype(np.float16))
            )
    result = node.outputs[0]
    result.type = ir.TensorType(ir.DataType.FLOAT16)
    cast_out = b.node(
        "Cast", [result], f"{name}/Cast_out", f"{name}.output_fp32", to=ir.DataType.FLOAT
    )
    b.graph.insert_after(node, cast_out)
    # the layer's old output name stays the name of the float32 tensor
    old = result.name
    result.replace_all_uses_with(cast_out.outputs[0], replace_graph_outputs=True)
    cast_out.replace_input_with(0, result)
    result.name = b.unique(f"{name}.output_fp16")
    cast_out.outputs[0].name = old


def _smoothing(b: _Builder, artifact: CalibrationArtifact) -> None:
    """Fold the smoothing scales into the float initializers they change."""
    if not artifact.smoothing:
        return
    names = {n for n in b.graph.initializers}
    arrays = {n: b.array(n) for n in names if n.endswith((".weight", ".bias"))}
    for name, value in artifact.smoothed_arrays(arrays).items():
        if name not in b.graph.initializers:
            raise AvatarqError(f"smoothing changes {name!r}, which the graph does not hold")
        old = b.graph.initializers[name]
        tensor = ir.tensor(value.astype(np.float32), name=name)
        old.const_value = tensor


def _texel_biases(b: _Builder, artifact: CalibrationArtifact) -> int:
    """Store each texel bias and output offset in its format (`avatarq.calibration.biases`):
    float16 + Cast; int8 / INT4 + DequantizeLinear; uint8 blocks + Cast, Mul, Add, Reshape.
    Returns the opset the stored tensors need."""
    needs = MIN_OPSET
    for name, fmt in sorted(artifact.texel_biases.items()):
        if fmt == "fp32":
            continue
        value = b.graph.initializers.get(name)
        if value is None:
            raise AvatarqError(f"the graph has no texel bias or offset {name!r}")
        array = value.const_value.numpy()
        if fmt == "fp16":  # the same rounding for a bias and an offset
            q = b.const(f"{name}.fp16", array.astype(np.float16))
            nodes = [b.node("Cast", [q], f"{name}/Cast", f"{name}.fp32", to=ir.DataType.FLOAT)]
        elif name in OFFSET_NAMES:
            nodes = _stored_offset(b, name, array, fmt)
        else:
            stored, scale, _ = quantize_bias(array, fmt, artifact.bias_scales.get(name))
            np_type, ir_type = _STORAGE[fmt]
            q = b.const(f"{name}.quantized", stored.astype(np_type), ir_type)
            if fmt == "int4":  # one scale per block of a row
                needs = max(needs, INT4_OPSET)
                s = b.const(f"{name}.scale", scale[None])
                block = {"axis": 3, "block_size": row_block(array.shape[-1])}
            else:
                s, block = b.const(f"{name}.scale", scale), {"axis": 1}
            nodes = [
                b.node("DequantizeLinear", [q, s], f"{name}/DQ", f"{name}.dequantized", **block)
            ]
        users = [u.node for u in value.uses()]
        b.graph.insert_before(users[0], nodes)
        value.replace_all_uses_with(nodes[-1].outputs[0])
    return needs


def _stored_offset(b: _Builder, name: str, array: np.ndarray, fmt: str) -> list[ir.Node]:
    """uint8 blocks: codes -> Cast -> * block scale -> + block base -> Reshape [1, C, H, W]."""
    parts, _ = quantize_offset(array, fmt)
    codes = b.const(f"{name}.codes", parts["codes"])
    cast = b.node("Cast", [codes], f"{name}/Cast", f"{name}.codes_fp32", to=ir.DataType.FLOAT)
    scale = b.const(f"{name}.block_scale", parts["scale"])
    mul = b.node("Mul", [cast.outputs[0], scale], f"{name}/Mul", f"{name}.scaled")
    base = b.const(f"{name}.block_base", parts["base"])
    add = b.node("Add", [mul.outputs[0], base], f"{name}/Add", f"{name}.blocks")
    shape = b.const(f"{name}.shape", np.asarray(array.shape, np.int64))
    reshape = b.node("Reshape", [add.outputs[0], shape], f"{name}/Reshape", f"{name}.stored")
    return [cast, mul, add, reshape]


def _raise_opset(graph: ir.Graph, opset: int) -> None:
    """Import ``opset`` (> 19) for the default domain, converting GridSample's mode names."""
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _CHANGED_AFTER_19:
            raise AvatarqError(
                f"raising the opset to {opset} would change the meaning of {node.op_type} "
                f"(node {node.name!r})"
            )
        if node.op_type == "GridSample" and "mode" in node.attributes:
            mode = node.attributes["mode"].value
            renamed = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
            node.attributes["mode"] = ir.AttrString("mode", renamed)
        node.version = None
    graph.opset_imports[""] = opset


def quantize_onnx(
    model: onnx.ModelProto, artifact: CalibrationArtifact, config: QDQConfig = QDQConfig()
) -> onnx.ModelProto:
    """A copy of the float32 graph ``model`` carrying ``artifact``'s precision plan.

    Every layer the artifact names must be a node of the graph (found by its weight
    initializer ``<layer>.weight``, see `layer_nodes`), and vice versa.

    Raises:
        AvatarqError: opset < 19, a layer missing on either side, a weight-shape mismatch,
            a graph that is not float32.
    """
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise AvatarqError(f"Q/DQ insertion needs opset >= {MIN_OPSET}, the graph has {opset}")
    nodes = layer_nodes(model)
    for name in nodes:
        if name not in artifact.layer_names:
            raise AvatarqError(
                f"the calibration is missing layer {name!r} of the graph; recalibrate"
            )
    for layer in artifact.layers:
        if layer.name not in nodes:
            raise AvatarqError(f"the graph has no node for calibrated layer {layer.name!r}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    m = ir.from_proto(copy)
    graph = m.graph
    b = _Builder(graph)
    _smoothing(b, artifact)
    by_node = {nodes[layer.name].name: layer for layer in artifact.layers}
    needs = opset
    for node in list(graph):
        layer = by_node.get(node.name)
        if layer is None or layer.precision == "fp32":
            continue
        if layer.precision == "fp16":
            _fp16_layer(b, node, layer.name)
            continue
        if not layer.quantized:
            raise InternalError(f"unknown precision {layer.precision!r}")
        weight = graph.initializers[f"{layer.name}.weight"]
        conv = node.op_type in ("Conv", "ConvTranspose")
        act_nodes, dq = _activation_nodes(b, layer, node.inputs[0], conv)
        w_nodes, w_dq = _weight_nodes(b, layer, weight.name, config)
        graph.insert_before(node, act_nodes + w_nodes)
        node.replace_input_with(0, dq)
        # every consumer of the float weight (the layer itself, or a Transpose in front of
        # a MatMul) reads the dequantized weight instead
        weight.replace_all_uses_with(w_dq)
        if layer.format.weight_container == "int4" or layer.weight_block:
            needs = max(needs, INT4_OPSET)
    needs = max(needs, _texel_biases(b, artifact))
    if needs > opset:
        _raise_opset(graph, needs)
    for name in [
        n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()
    ]:
        graph.initializers.pop(name)
    m.ir_version = config.ir_version
    _set_metadata(m, artifact, config)
    return ir.to_proto(m)


def _set_metadata(model: ir.Model, artifact: CalibrationArtifact, config: QDQConfig) -> None:
    entries = {
        "avatarq.qdq_version": str(QDQ_VERSION),
        "avatarq.calibration.model_hash": artifact.model_hash,
        "avatarq.calibration.samples_hash": str(artifact.samples.get("hash", "")),
        "avatarq.calibration.method": str(artifact.config.get("method", "")),
        "avatarq.calibration.bits": str(artifact.config.get("bits", "")),
        "avatarq.qdq.conv_transpose_axis": str(config.conv_transpose_axis),
    }
    kept = {k: v for k, v in model.metadata_props.items() if k not in entries}
    model.metadata_props.clear()
    model.metadata_props.update(kept)
    for key in sorted(entries):
        model.metadata_props[key] = entries[key]


# Agreement of ONNX Runtime on the Q/DQ graph with the torch fake-quant model: both round the
# same numbers; float accumulation order can move a value across a rounding boundary of
# the next quantizer, which is an isolated one-step error. Weights that amplify such steps
# (an untrained checkpoint at 4 bits) spread them, so the gate is 60 dB, or 20 dB above
# the graph's own error against FP32 when that is lower: the mismatch then carries at most
# 1% of the quantization error's energy, and a graph that computes something else fails.
FAKEQUANT_MIN_PSNR_DB = 60.0
FAKEQUANT_MARGIN_DB = 20.0


def fakequant_gate_db(
    quantization_psnr_db: float, min_psnr_db: float = FAKEQUANT_MIN_PSNR_DB
) -> float:
    """The PSNR (dB, over all inputs) the Q/DQ graph must reach against the fake-quant
    model, given its PSNR against the FP32 decoder (the quantization error)."""
    return min(min_psnr_db, quantization_psnr_db + FAKEQUANT_MARGIN_DB)


def validate_qdq(
    model_path: str | Path,
    decoder: nn.Module,
    artifact: CalibrationArtifact,
    inputs: DecoderInputs,
    config: QDQConfig = QDQConfig(),
    min_psnr_db: float = FAKEQUANT_MIN_PSNR_DB,
) -> tuple[Comparison, Comparison]:
    """ONNX Runtime on the Q/DQ graph at ``model_path`` against the torch fake-quant model
    `FakeQuantDecoder(decoder, artifact)` (judged: PSNR over all inputs >=
    `fakequant_gate_db` of the graph's PSNR against FP32; the numerics are as calibrated)
    and against ``decoder`` in FP32 (reported: the quantization error itself)."""
    from avatarq.calibration.fakequant import FakeQuantDecoder

    peak = 255.0 if getattr(decoder, "denormalized", False) else None
    fake = FakeQuantDecoder(decoder, artifact, config.conv_transpose_axis)
    vs_fp32 = validate_against_torch(model_path, decoder, inputs, Tolerances(), peak, "torch fp32")
    gate = fakequant_gate_db(vs_fp32.image.psnr_all, min_psnr_db)
    vs_fakequant = validate_against_torch(
        model_path, fake, inputs, Tolerances(min_psnr_all=gate), peak, "torch fake-quant"
    )
    return vs_fakequant, vs_fp32
