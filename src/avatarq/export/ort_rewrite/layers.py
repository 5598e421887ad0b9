"""Find the quantized layers of a Q/DQ graph and what an exact evaluation of each needs.

A quantized layer is a Conv, ConvTranspose, Gemm or MatMul whose data input is a per-tensor
``DequantizeLinear`` of an 8-bit tensor and whose weight is a ``DequantizeLinear`` of an
int8 constant with zero point 0 (per tensor or per output channel). Its value is

    y = sum_k (x_k - zx) * sx * w_k * sw_c (+ bias_c)

The integer sum ``acc = sum_k (x_k - zx) * w_k`` is exact in int32 and, while it stays below
2^24 in magnitude, in float32 too (every partial sum is an integer that float32 holds
exactly, whatever the summation order). `QuantLayer.bound` is the largest |acc| the layer
can reach; its exact value is then ``fl(fl(acc * fl(sx * sw_c)) + bias_c)``: one rounding
for the rescale, one for the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from avatarq.export.ort_rewrite.graph import array, attr, spatial
from avatarq.export.ort_rewrite.phases import phase_weights

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Largest integer magnitude below which every float32 integer sum is exact.
EXACT_LIMIT = 2**24
_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


@dataclass
class QuantLayer:
    """One quantized linear layer of the graph.

    Attributes:
        node: the Conv/ConvTranspose/Gemm/MatMul node.
        q: the 8-bit tensor its input DequantizeLinear reads (int8 or uint8, any layout).
        x_scale: the activation scale (float32 scalar).
        x_zero_point: the activation zero point (int8 or uint8 scalar array).
        weight: the int8 weight in the node's layout (Conv [Cout, Cin, kh, kw],
            ConvTranspose [Cin, Cout, kh, kw], Gemm [N, K] with transB else [K, N],
            MatMul [K, N]).
        w_scale: float32 [Cout], the weight scale of each output channel.
        bias: float32 bias added by the node (Conv/ConvTranspose [Cout], Gemm C as given),
            or None.
        bound: the largest |integer accumulator| any input can produce.
        problem: why the layer has no exact integer evaluation ('' when it has one).
    """

    node: ir.Node
    q: ir.Value
    x_scale: np.float32
    x_zero_point: np.ndarray
    weight: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    bound: int
    problem: str = ""
    label: str = ""

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        """The layer's name: its weight's name without the quantization suffix (the torch
        module name for avatarq exports), else the node's name."""
        return self.label or self.node.name or str(self.node.outputs[0].name)

    @property
    def cout(self) -> int:
        return int(self.w_scale.shape[0])

    @property
    def rescale(self) -> np.ndarray:
        """fl(sx * sw_c), float32 [Cout]: what the integer accumulator is multiplied by."""
        return (np.float32(self.x_scale) * self.w_scale).astype(np.float32)

    @property
    def out_axis(self) -> int:
        """Axis of the output channels in the node's output (1 for convolutions, -1 else)."""
        return 1 if self.op in ("Conv", "ConvTranspose") else -1

    def matrix(self) -> np.ndarray:
        """Gemm/MatMul weight as the [K, N] int8 matrix the input multiplies."""
        if self.op == "Gemm" and attr(self.node, "transB", 0):
            return np.ascontiguousarray(self.weight.T)
        return self.weight


def _weight_axis(node: ir.Node) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 0 if node.op_type == "Conv" else 1


def _accumulator_bound(node: ir.Node, weight: np.ndarray, amax: int) -> int:
    """max over output channels of amax * sum |w| over the weights one output sums."""
    w = np.abs(weight.astype(np.int64))
    if node.op_type == "ConvTranspose":
        if weight.ndim == 4 and weight.shape[2:] == (4, 4) and attr(node, "strides") == (2, 2):
            per = phase_weights(w).sum(axis=(2, 3, 4))  # [4, Cout]
        else:
            per = w.sum(axis=(0, 2, 3))  # every tap may land on one output
    elif node.op_type == "Conv":
        per = w.sum(axis=(1, 2, 3))
    else:
        per = w.sum(axis=1 - _weight_axis(node))
    return int(per.max()) * amax


def _scale_zero_point(dq: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = array(dq.inputs[1])
    has_zp = len(dq.inputs) > 2 and dq.inputs[2] is not None
    zp = array(dq.inputs[2]) if has_zp else None
    return scale, zp


def _activation(node: ir.Node) -> tuple[ir.Value, np.float32, np.ndarray] | str:
    """(8-bit tensor, scale, zero point) of the per-tensor DequantizeLinear feeding node."""
    dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return "its input is not dequantized"
    scale, zp = _scale_zero_point(dq)
    q = dq.inputs[0]
    if array(q) is not None:
        return "its input is a constant"
    if scale is None or scale.size != 1 or scale.dtype != np.float32:
        return "its input scale is not a constant float32 scalar"
    if zp is None and (len(dq.inputs) < 3 or dq.inputs[2] is None) and q.dtype is not None:
        zp = np.zeros((), q.dtype.numpy())  # ONNX default: zero point 0 of the data's type
    if zp is None or zp.size != 1 or zp.dtype not in _RANGES:
        return "its input zero point is not an 8-bit constant scalar"
    return q, np.float32(scale.reshape(())), zp.reshape(())


def _label(node: ir.Node) -> str:
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] else None
    name = str(dq.inputs[0].name or "") if dq is not None else ""
    for suffix in (".weight_quantized", "_quantized"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return ""


def _weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(int8 weight, float32 per-output-channel scale) of node's weight DequantizeLinear."""
    source = node.inputs[1] if len(node.inputs) > 1 else None
    dq = source.producer() if source is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return "its weight is not dequantized"
    q = array(dq.inputs[0])
    scale, zp = _scale_zero_point(dq)
    if q is None or q.dtype != np.int8 or scale is None or scale.dtype != np.float32:
        return "its weight is not an int8 constant with float32 scales"
    if zp is not None and np.any(zp != 0):
        return "its weight zero point is not 0"
    if attr(dq, "block_size", 0):
        return "its weight scales are blocked"
    axis = _weight_axis(node)
    cout = q.shape[axis]
    if scale.size == 1:
        return q, np.full(cout, scale.reshape(()), np.float32)
    dq_axis = attr(dq, "axis", 1) % q.ndim
    if scale.ndim != 1 or dq_axis != axis or scale.shape[0] != cout:
        return f"its weight scales run along axis {dq_axis}, not the output channels ({axis})"
    return q, scale


def _bias(node: ir.Node) -> np.ndarray | None | str:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = array(node.inputs[2])
    if bias is None or bias.dtype != np.float32:
        return "its bias is not a float32 constant"
    if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
        return "Gemm beta is not 1"
    return bias


def _op_problem(node: ir.Node, weight: np.ndarray) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        if attr(node, "group", 1) != 1:
            return "grouped"
        if weight.ndim != 4:
            return f"{weight.ndim - 2}-d convolution"
        if any(d != 1 for d in attr(node, "dilations", (1, 1))):
            return "dilated"
        if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "auto_pad"
    if node.op_type == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "transA", 0)):
        return "Gemm with alpha != 1 or transA"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return "MatMul with a weight that is not a matrix"
    if node.op_type == "Conv" and spatial(node.inputs[0]) is None:
        return "Conv input of unknown spatial size"
    return ""


def find_layers(graph: ir.Graph) -> list[QuantLayer]:
    """Every quantized linear layer of ``graph``, in graph order.

    Layers whose input or weight is not quantized as described in the module docstring are
    not returned; returned layers with a non-empty ``problem`` have no exact integer
    evaluation (they stay as the graph computes them).
    """
    layers = []
    for node in graph:
        if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
            continue
        act, weight = _activation(node), _weight(node)
        if isinstance(act, str) or isinstance(weight, str):
            continue
        q, sx, zx = act
        w, sw = weight
        bias = _bias(node)
        lo, hi = _RANGES[zx.dtype]
        amax = max(int(zx) - lo, hi - int(zx))
        bound = _accumulator_bound(node, w, amax)
        problem = bias if isinstance(bias, str) else _op_problem(node, w)
        if not problem and bound >= EXACT_LIMIT:
            problem = f"its accumulator can reach {bound} >= 2^24"
        if not problem and node.op_type == "Gemm" and bias is not None:
            if bias.size not in (1, w.shape[_weight_axis(node)]) or bias.ndim > 2:
                problem = "Gemm bias is not one value per output"
        kept_bias = None if isinstance(bias, str) else bias
        layers.append(QuantLayer(node, q, sx, zx, w, sw, kept_bias, bound, problem, _label(node)))
    return layers
