"""Insert the calibration's precision plan into the float ONNX graph: Q/DQ nodes and FP16 casts.

TensorRT 11 is strongly typed, so the graph IS the precision plan (deploy.md):

- int8 layer (Conv, ConvTranspose, Gemm, MatMul): its data input goes through a per-tensor
  ``QuantizeLinear -> DequantizeLinear`` (scale float32 scalar, zero point int8 0; uint8
  with a zero point for asymmetric calibrations, an ONNX Runtime-only form). A grid of
  b < 8 bits clips the activation first (``Clip`` to the grid's end points), inside the
  8-bit container. The weight initializer becomes int8 integers behind a per-output-
  channel ``DequantizeLinear`` (axis 0 for Conv/Gemm weights, 1 for ConvTranspose weights
  [Cin, Cout, kH, kW]; the ConvTranspose axis is a parameter because TensorRT versions
  disagree about it). Nothing is quantized on outputs; biases, texel biases and
  activations stay float32.
- fp16 layer: ``Cast`` to float16 on the data input, float16 weight and bias, ``Cast``
  back to float32 on the output.
- fp32 layer: unchanged.

Graph inputs and outputs stay float32, the opset must be >= 19, and the IR version is set
explicitly (<= 10, which ONNX Runtime loads). The same graph and artifact always give the
same bytes. `avatarq.calibration.FakeQuantDecoder` computes what this graph computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from avatarq.calibration.artifact import CalibrationArtifact, LayerCalibration
from avatarq.calibration.quantizers import activation_range
from avatarq.core.inputs import DecoderInputs
from avatarq.errors import AvatarqError, InternalError
from avatarq.export.onnx_export import layer_nodes
from avatarq.export.validate import validate_against_torch
from avatarq.measure import Comparison, Tolerances

QDQ_VERSION = 1
MIN_OPSET = 19
MAX_IR_VERSION = 10
CONV_TRANSPOSE_AXES = (1, 0, None)


@dataclass(frozen=True)
class QDQConfig:
    """How the plan is written into the graph.

    Attributes:
        conv_transpose_axis: weight-scale axis of ConvTranspose layers: 1 (per output
            channel, what avatarq calibrates), 0 (per input channel) or None (per tensor).
            0 and None re-quantize the weights from their float values (max calibration
            along the chosen axis): a fallback for TensorRT versions that reject axis 1.
        ir_version: the ONNX IR version written (<= 10 so ONNX Runtime loads it).
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


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.taken = {i.name for i in self.graph.initializer}
        self.taken |= {o for n in self.graph.node for o in n.output}
        self.taken |= {i.name for i in self.graph.input}

    def name(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        init = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(init)
        self.inits[name] = init
        return name

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise AvatarqError(f"layer weight {name!r} is not an initializer of the graph")
        return numpy_helper.to_array(self.inits[name])


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise AvatarqError("the ONNX graph imports no default-domain opset")


def _activation_nodes(
    b: _Builder, layer: LayerCalibration, source: str
) -> tuple[list[onnx.NodeProto], str]:
    """Clip (b < 8) -> QuantizeLinear -> DequantizeLinear of ``source``; returns the DQ output."""
    grid = activation_range(layer.bits, layer.symmetric)
    scale = np.float32(layer.input_scale)
    zp_type = np.int8 if layer.symmetric else np.uint8
    zp = int(layer.input_zero_point or 0)
    base = layer.name
    s_name = b.const(f"{base}.input_scale", np.asarray(scale, np.float32))
    z_name = b.const(f"{base}.input_zero_point", np.asarray(zp, zp_type))
    nodes = []
    full = np.iinfo(zp_type)
    x = source
    if grid.qmin > full.min or grid.qmax < full.max:
        lo = b.const(f"{base}.input_clip_min", np.float32((grid.qmin - zp) * scale))
        hi = b.const(f"{base}.input_clip_max", np.float32((grid.qmax - zp) * scale))
        clipped = b.name(f"{base}.input_clipped")
        nodes.append(helper.make_node("Clip", [x, lo, hi], [clipped], name=b.name(f"{base}/Clip")))
        x = clipped
    q = b.name(f"{base}.input_quantized")
    dq = b.name(f"{base}.input_dequantized")
    nodes.append(
        helper.make_node("QuantizeLinear", [x, s_name, z_name], [q], name=b.name(f"{base}/Q"))
    )
    nodes.append(
        helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=b.name(f"{base}/DQ"))
    )
    return nodes, dq


def _weight_nodes(
    b: _Builder, layer: LayerCalibration, weight_name: str, config: QDQConfig
) -> tuple[list[onnx.NodeProto], str]:
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
    q, scale, axis = layer.graph_weight(weight, config.conv_transpose_axis)
    base = layer.name
    q_name = b.const(f"{base}.weight_quantized", q)
    s_name = b.const(f"{base}.weight_scale", scale)
    z_name = b.const(f"{base}.weight_zero_point", np.zeros(scale.shape, np.int8))
    out = b.name(f"{base}.weight_dequantized")
    attrs = {} if axis is None else {"axis": int(axis)}
    node = helper.make_node(
        "DequantizeLinear",
        [q_name, s_name, z_name],
        [out],
        name=b.name(f"{base}/weight_DQ"),
        **attrs,
    )
    return [node], out


def _fp16_const(b: _Builder, name: str) -> str:
    return b.const(f"{name}.fp16", b.array(name).astype(np.float16))


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
    if _opset(model) < MIN_OPSET:
        raise AvatarqError(
            f"Q/DQ insertion needs opset >= {MIN_OPSET}, the graph has {_opset(model)}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    b = _Builder(out)
    nodes = layer_nodes(out)
    for name in nodes:
        if name not in artifact.layer_names:
            raise AvatarqError(
                f"the calibration is missing layer {name!r} of the graph; recalibrate"
            )
    for layer in artifact.layers:
        if layer.name not in nodes:
            raise AvatarqError(f"the graph has no node for calibrated layer {layer.name!r}")
    by_node = {nodes[layer.name].name: layer for layer in artifact.layers}
    weight_of = {layer.name: f"{layer.name}.weight" for layer in artifact.layers}

    rebuilt: list[onnx.NodeProto] = []
    dequantized_weight: dict[str, str] = {}
    for node in list(out.graph.node):
        layer = by_node.get(node.name)
        if layer is None or layer.precision == "fp32":
            rebuilt.append(node)
            continue
        if layer.precision == "int8":
            act_nodes, dq = _activation_nodes(b, layer, node.input[0])
            w_nodes, w_dq = _weight_nodes(b, layer, weight_of[layer.name], config)
            dequantized_weight[weight_of[layer.name]] = w_dq
            rebuilt += act_nodes + w_nodes
            node.input[0] = dq
            rebuilt.append(node)
            continue
        if layer.precision != "fp16":
            raise InternalError(f"unknown precision {layer.precision!r}")
        half_in = b.name(f"{layer.name}.input_fp16")
        rebuilt.append(
            helper.make_node(
                "Cast",
                [node.input[0]],
                [half_in],
                to=TensorProto.FLOAT16,
                name=b.name(f"{layer.name}/Cast_in"),
            )
        )
        node.input[0] = half_in
        for i in range(1, len(node.input)):
            if node.input[i]:
                node.input[i] = _fp16_const(b, node.input[i])
        result = node.output[0]
        half_out = b.name(f"{layer.name}.output_fp16")
        node.output[0] = half_out
        rebuilt.append(node)
        rebuilt.append(
            helper.make_node(
                "Cast",
                [half_out],
                [result],
                to=TensorProto.FLOAT,
                name=b.name(f"{layer.name}/Cast_out"),
            )
        )
    # every consumer of a quantized weight (the layer node itself, or a Transpose in front
    # of a MatMul) reads the dequantized weight instead
    for node in rebuilt:
        for i, name in enumerate(node.input):
            if name in dequantized_weight and node.op_type != "DequantizeLinear":
                node.input[i] = dequantized_weight[name]
    del out.graph.node[:]
    out.graph.node.extend(rebuilt)
    _drop_unused_initializers(out)
    out.ir_version = config.ir_version
    _set_metadata(out, artifact, config)
    return out


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _set_metadata(model: onnx.ModelProto, artifact: CalibrationArtifact, config: QDQConfig) -> None:
    entries = {
        "avatarq.qdq_version": str(QDQ_VERSION),
        "avatarq.calibration.model_hash": artifact.model_hash,
        "avatarq.calibration.samples_hash": str(artifact.samples.get("hash", "")),
        "avatarq.calibration.method": str(artifact.config.get("method", "")),
        "avatarq.qdq.conv_transpose_axis": str(config.conv_transpose_axis),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key in sorted(entries):
        model.metadata_props.add(key=key, value=entries[key])


# Agreement of ONNX Runtime on the Q/DQ graph with the torch fake-quant model: both round the
# same numbers; float accumulation order can move a value across a rounding boundary of
# the next quantizer, which is an isolated one-step error.
FAKEQUANT_MIN_PSNR_DB = 60.0


def validate_qdq(
    model_path: str | Path,
    decoder: nn.Module,
    artifact: CalibrationArtifact,
    inputs: DecoderInputs,
    config: QDQConfig = QDQConfig(),
    min_psnr_db: float = FAKEQUANT_MIN_PSNR_DB,
) -> tuple[Comparison, Comparison]:
    """ONNX Runtime on the Q/DQ graph at ``model_path`` against the torch fake-quant model
    `FakeQuantDecoder(decoder, artifact)` (judged: PSNR over all inputs >= ``min_psnr_db``;
    the numerics are as calibrated) and against ``decoder`` in FP32 (reported: the
    quantization error itself)."""
    from avatarq.calibration.fakequant import FakeQuantDecoder

    peak = 255.0 if getattr(decoder, "denormalized", False) else None
    fake = FakeQuantDecoder(decoder, artifact, config.conv_transpose_axis)
    vs_fakequant = validate_against_torch(
        model_path, fake, inputs, Tolerances(min_psnr_all=min_psnr_db), peak, "torch fake-quant"
    )
    vs_fp32 = validate_against_torch(model_path, decoder, inputs, Tolerances(), peak, "torch fp32")
    return vs_fakequant, vs_fp32
