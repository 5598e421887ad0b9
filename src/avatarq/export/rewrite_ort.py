"""Graph rewrite that gives ONNX Runtime's CPU provider a fast decoder, exact to its graph.

ONNX Runtime's CPU ConvTranspose is slow (a GEMM into a column buffer plus an overlapping
col2im), and it has no INT8 ConvTranspose at all: a Q/DQ ConvTranspose runs in float with
extra Q/DQ work, which makes a plain Q/DQ decoder SLOWER than FP32 on the CPU. This module
rewrites every ConvTranspose(kernel 4, stride 2, pad 1) into stride-1 convolutions.

The identity (exact, no extra MACs): output phase (a, b) of ConvTranspose(k4, s2, p1), i.e.
the output texels (2m + a, 2k + b), is a 2x2 stride-1 convolution of the input with the
taps ``w[:, :, TAPS[a], TAPS[b]]`` (``TAPS = ((3, 1), (2, 0))``) and pads (top, left,
bottom, right) = (1 - a, 1 - b, a, b).

All four phases are computed by ONE 2x2 Conv with 4 x Cout output channels and pads 1
(`merged_phase_weights`); its [H + 1, W + 1] output, read channels-last as blocks of 2 x 2
texels, is the layer output with one extra texel on every side.

The rewrite adds no rounding and no scale that the graph does not have. An ``int8`` layer
(its input has a per-tensor Q/DQ, its weights are int8, and its output reaches the next
quantized layer's QuantizeLinear through elementwise ops: the untied texel bias, LeakyReLU)
becomes: the merged Conv on the dequantized input with the dequantized weights (the values
the Q/DQ graph computes with) -> the same elementwise ops, their constants laid out like
the conv output -> the graph's own QuantizeLinear (same scale, zero point and type) -> an
interleave of the 8-bit data (Transpose to channels-last, one Transpose of 2 x 2 blocks, a
crop, Transpose back) into the very tensor that Q produced, so the next layer's
DequantizeLinear reads what it read before. The result equals the Q/DQ graph up to float
summation order: a quantized value moves by one step only where the float result lies on
a rounding boundary.

Why the convolutions run in float: ONNX Runtime's INT8 convolution (QLinearConv) must write
8-bit output, which would be a rounding the graph does not have, with a NEW scale. The
texel bias and the LeakyReLU lie between the conv and the next Q, so no scale taken from
the graph both avoids clipping and keeps the steps as fine as the graph's: a range that
cannot clip must cover the next Q's range divided by the LeakyReLU slope, shifted by the
bias, i.e. steps ~5x the next Q's (68 dB against the Q/DQ graph on the trained demo
avatar). An earlier version took that scale from max |y| over seeded N(0, 1) latents;
real latent codes are not unit-variance and clipped there (64 dB, worst frame 50 dB; now
exact). At these channel counts ONNX Runtime's float NCHWc convolutions are about as fast
as its INT8 ones and the interleave still moves 8-bit data, so the exact form costs no
speed (full-size DAM: 0.53x the FP32 latency, as before).

Layers without such a QuantizeLinear after them (the 16 -> 3 output layer, float graphs)
become ``float`` phase convolutions: one 2x2 Conv with 4 x Cout outputs and Col2Im, with a
following Add/Mul-by-constant tail folded in (exact). Every other weight DequantizeLinear
(e.g. of a Gemm, which ONNX Runtime does not fuse without an output Q) is folded into a
float initializer: the same values, without dequantizing on every run.

For ONNX Runtime targets only: TensorRT keeps ConvTranspose (it fuses Q/DQ around it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from avatarq.errors import AvatarqError

REWRITE_VERSION = 2
# Kernel taps of output phase 0 and 1 along one axis, for input rows (m - 1 + p, m + p).
TAPS = ((3, 1), (2, 0))
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))
# Nodes an int8 layer's phases repeat between the conv and the next layer's QuantizeLinear.
_TAIL_OPS = ("Add", "Mul", "LeakyRelu", "Relu", "Clip")


def phase_pads(a: int, b: int) -> tuple[int, int, int, int]:
    """Conv pads (top, left, bottom, right) of output phase (a, b)."""
    return (1 - a, 1 - b, a, b)


def phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> the four stride-1 phase conv weights.

    Args:
        weight: [Cin, Cout, 4, 4] (ONNX/torch ConvTranspose layout), any dtype.

    Returns:
        [4, Cout, Cin, 2, 2] of the same dtype (values re-arranged, never changed); entry
        ``2 * a + b`` is output phase (a, b): a Conv with it, stride 1 and pads
        `phase_pads(a, b)` gives the output texels (2m + a, 2k + b) of the ConvTranspose.
    """
    if weight.ndim != 4 or weight.shape[2:] != (4, 4):
        raise AvatarqError(
            f"phase_weights needs a [Cin, Cout, 4, 4] weight, got {list(weight.shape)}"
        )
    w = np.swapaxes(weight, 0, 1)  # [Cout, Cin, 4, 4]
    phases = [w[:, :, list(TAPS[a]), :][:, :, :, list(TAPS[b])] for a, b in PHASES]
    return np.ascontiguousarray(np.stack(phases))


@dataclass(frozen=True)
class OrtRewriteConfig:
    """How `rewrite_for_ort` treats the graph.

    Attributes:
        min_int8_out_channels: quantized ConvTranspose layers with fewer output channels
            become ``float`` (one merged conv + Col2Im) instead of per-phase ``int8``.
        fold_weight_dq: fold weight DequantizeLinear nodes that ONNX Runtime would run on
            every inference (weights of float layers, Gemm) into float initializers.
        version: schema version of this config.
    """

    min_int8_out_channels: int = 8
    fold_weight_dq: bool = True
    version: int = REWRITE_VERSION

    def __post_init__(self) -> None:
        if self.version != REWRITE_VERSION:
            raise AvatarqError(
                f"ORT rewrite config version {self.version} is not supported "
                f"(expected {REWRITE_VERSION})"
            )
        if self.min_int8_out_channels < 1:
            raise AvatarqError(
                f"min_int8_out_channels must be >= 1, got {self.min_int8_out_channels}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrtRewriteConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise AvatarqError(f"unknown ORT rewrite option(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class LayerRewrite:
    """What happened to one ConvTranspose node.

    Attributes:
        node: the ConvTranspose node's name.
        mode: ``int8`` (per-phase convolutions requantized by the graph's own QuantizeLinear
            and interleaved as 8-bit data), ``float`` (one merged conv + Col2Im) or ``kept``
            (not a rewritable ConvTranspose; unchanged).
        reason: why the layer is ``float`` or ``kept``.
        output_scale: for an ``int8`` layer, the scale of the QuantizeLinear its phases
            end in: the next quantized layer's input scale, read from the graph.
    """

    node: str
    mode: str
    reason: str = ""
    output_scale: float | None = None


@dataclass
class RewriteResult:
    """The rewritten model, one `LayerRewrite` per ConvTranspose (graph order), and the
    number of weight DequantizeLinear nodes folded into float initializers."""

    model: onnx.ModelProto
    layers: list[LayerRewrite] = field(default_factory=list)
    folded_weight_dq: int = 0

    @property
    def n_int8(self) -> int:
        return sum(layer.mode == "int8" for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "folded_weight_dq": self.folded_weight_dq,
        }


# --------------------------------------------------------------------------- graph index


class _Graph:
    """Producers, consumers and initializers of a graph; makes unique names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._names = set(self.inits) | {n.name for n in self.graph.node}
        self._names |= set(self.producer) | {i.name for i in self.graph.input}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def node(self, op: str, inputs: list[str], outputs: list[str], base: str, **attrs):
        return helper.make_node(op, inputs, outputs, name=self.unique(f"{base}/{op}"), **attrs)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _not_k4s2p1(node: onnx.NodeProto) -> str:
    """Why ``node`` is not a plain ConvTranspose(k4, s2, p1) ('' when it is one)."""
    a = _attrs(node)
    checks = [
        (a.get("group", 1) != 1, "grouped"),
        (list(a.get("strides", [1, 1])) != [2, 2], f"strides {list(a.get('strides', [1, 1]))}"),
        (list(a.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1], f"pads {list(a.get('pads', []))}"),
        (list(a.get("dilations", [1, 1])) != [1, 1], "dilated"),
        (any(a.get("output_padding", [0, 0])) or "output_shape" in a, "output padding/shape"),
        (a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"), "auto_pad"),
        (list(a.get("kernel_shape", [4, 4])) != [4, 4], f"kernel {a.get('kernel_shape')}"),
    ]
    return next((why for bad, why in checks if bad), "")


@dataclass
class _Weights:
    """A ConvTranspose weight: float values, and int8 values with their scales if usable."""

    float_values: np.ndarray  # [Cin, Cout, 4, 4] float32 (dequantized if quantized)
    int8: np.ndarray | None = None  # [Cin, Cout, 4, 4]
    scale: np.ndarray | None = None  # [Cout] or scalar
    problem: str = ""


def _dequantize(
    g: _Graph, dq: onnx.NodeProto
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(float values, q, scale, axis) of a DequantizeLinear of initializers, else None."""
    q = g.array(dq.input[0])
    scale = g.array(dq.input[1])
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if (
        q is None
        or scale is None
        or scale.dtype != np.float32
        or q.dtype not in (np.int8, np.uint8)
        or "block_size" in _attrs(dq)  # blocked scales: left to ONNX Runtime
    ):
        return None
    axis = _attrs(dq).get("axis", 1) % max(q.ndim, 1)
    shape = [1] * q.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    zp_f = np.float32(0) if zp is None else zp.astype(np.float32).reshape(shape)
    values = ((q.astype(np.float32) - zp_f) * scale.reshape(shape)).astype(np.float32)
    if zp is not None and np.any(zp != 0):
        q = None  # asymmetric: usable as float only
    return values, q, scale, axis


def _weights(g: _Graph, name: str) -> _Weights | None:
    values = g.array(name)
    if values is not None:
        return _Weights(values) if values.dtype == np.float32 and values.ndim == 4 else None
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    found = _dequantize(g, dq)
    if found is None:
        return None
    values, q, scale, axis = found
    if q is None or q.dtype != np.int8:
        return _Weights(values, problem="weights are not int8 symmetric")
    if scale.ndim == 1 and axis != 1:
        return _Weights(values, problem=f"weight scales run along axis {axis}, not output channels")
    return _Weights(values, q, scale)


def _activation_q(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The QuantizeLinear of a per-tensor activation Q -> DQ feeding ``name``: int8 with zero
    point 0 (symmetric, what TensorRT needs) or uint8 with any zero point (asymmetric, the
    form ONNX Runtime runs natively); None for anything else."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = g.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    scale = g.array(dq.input[1])
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if scale is None or scale.size != 1 or zp is None or zp.size != 1:
        return None
    if not (zp.dtype == np.uint8 or (zp.dtype == np.int8 and not zp.any())):
        return None
    if any(c.op_type != "DequantizeLinear" for c in g.consumers.get(q.output[0], [])):
        return None
    return q


# --------------------------------------------------------------------------- inputs


def default_calibration_feeds(
    model: onnx.ModelProto, n: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs: N(0, 1) for every input but ``view`` (unit vectors around +z).

    The build check's default inputs; the rewrite itself needs no sample data.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
        if value.name == "view":
            v = rng.normal(size=(n, 3)) * 0.3 + np.array([0.0, 0.0, 1.0])
            feeds["view"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        else:
            feeds[value.name] = rng.standard_normal((n, *dims)).astype(np.float32)
    return feeds


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(H, W) of every 4-d tensor whose spatial size shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            sizes[value.name] = (dims[2].dim_value, dims[3].dim_value)
    return sizes


# --------------------------------------------------------------------------- rewrite


def rewrite_for_ort(
    model: onnx.ModelProto, config: OrtRewriteConfig = OrtRewriteConfig()
) -> RewriteResult:
    """Rewrite every ConvTranspose(k4, s2, p1) of ``model`` into stride-1 phase convolutions.

    Args:
        model: an ONNX decoder, float or with Q/DQ (not modified; a copy is rewritten). A
            ConvTranspose becomes ``int8`` when its input has a per-tensor Q -> DQ (int8
            with zero point 0, or uint8), its weight is an int8 symmetric initializer
            behind a DequantizeLinear (per-tensor, or per-output-channel = axis 1), it has
            at least ``config.min_int8_out_channels`` outputs, and its output reaches a
            per-tensor QuantizeLinear through single-consumer Add/Mul-by-constant,
            LeakyRelu, Relu or Clip nodes; other k4/s2/p1 layers become ``float``, anything
            else is ``kept``.
        config: see `OrtRewriteConfig`.

    Returns:
        `RewriteResult`. Inputs, outputs, opset and IR version are unchanged. The rewrite
        introduces no quantization scale: it equals the original graph up to float
        summation order (float graphs: max error ~1e-7 relative; Q/DQ graphs: the same,
        except that a value lying on a rounding boundary of a QuantizeLinear may move one
        quantization step).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    sizes = _spatial_sizes(model)
    graph_outputs = {o.name for o in out.graph.output}
    plans: list[tuple[onnx.NodeProto, _Weights | None, _Requant | None, LayerRewrite]] = []
    for node in [n for n in out.graph.node if n.op_type == "ConvTranspose"]:
        problem = _not_k4s2p1(node)
        weights = None if problem else _weights(g, node.input[1])
        if not problem and weights is None:
            problem = "weight is not float32 nor int8 behind a DequantizeLinear (fp16 layer?)"
        if not problem and weights.float_values.shape[2:] != (4, 4):
            problem = f"kernel {list(weights.float_values.shape[2:])}"
        if not problem and node.input[0] not in sizes:
            problem = "input height/width unknown to shape inference"
        if problem:
            plans.append((node, None, None, LayerRewrite(node.name, "kept", problem)))
            continue
        cout = weights.float_values.shape[1]
        h, w = sizes[node.input[0]]
        tail = None
        if weights.int8 is None:
            reason = weights.problem or "float weights"
        elif _activation_q(g, node.input[0]) is None:
            reason = "input has no per-tensor int8/uint8 Q/DQ"
        elif cout < config.min_int8_out_channels:
            reason = f"{cout} output channels < {config.min_int8_out_channels}"
        else:
            tail, reason = _requant_tail(g, node.output[0], cout, (2 * h, 2 * w), graph_outputs)
        if tail is None:
            plans.append((node, weights, None, LayerRewrite(node.name, "float", reason)))
        else:
            scale = float(g.array(tail.q.input[1]).reshape(()))
            plans.append((node, weights, tail, LayerRewrite(node.name, "int8", "", scale)))

    for node, weights, tail, layer in plans:
        if layer.mode == "kept":
            continue
        hw = sizes[node.input[0]]
        if tail is not None:
            replacement, absorbed = _requant_nodes(g, node, weights, tail, hw)
        else:
            replacement, absorbed = _float_phase_nodes(g, node, weights, hw, graph_outputs)
        index = list(out.graph.node).index(node)
        for gone in [node, *absorbed]:
            out.graph.node.remove(gone)
        for offset, new in enumerate(replacement):
            out.graph.node.insert(index + offset, new)
    _remove_dead(out)
    folded = _fold_weight_dq(out) if config.fold_weight_dq else 0
    return RewriteResult(out, [layer for *_, layer in plans], folded)


def col2im_phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> ONE 2x2 conv whose output Col2Im interleaves.

    Args:
        weight: [Cin, Cout, 4, 4] ConvTranspose weights, any dtype.

    Returns:
        [Cout * 4, Cin, 2, 2]: output channel ``4 * c + 2 * u + v`` is phase (1 - u, 1 - v)
        of channel c. A Conv with pads (1, 1, 1, 1) gives [N, 4 Cout, H + 1, W + 1]; as
        Col2Im columns (block 2x2, stride 2, pads 1, image 2H x 2W) it lands every phase on
        its texels (no two blocks overlap), which is the ConvTranspose output.
    """
    phases = phase_weights(weight)  # [4, Cout, Cin, 2, 2], index 2a + b
    order = [2 * (1 - u) + (1 - v) for u in (0, 1) for v in (0, 1)]
    merged = np.stack([phases[i] for i in order], axis=1)  # [Cout, 4, Cin, 2, 2]
    return np.ascontiguousarray(merged.reshape(-1, *merged.shape[2:]))


def _affine_tail(g: _Graph, y: str, cout: int, graph_outputs: set[str]):
    """Follow ``y`` through Add/Mul by constants: (per-channel scale, additive constant,
    final tensor name, nodes passed) with final = y * scale + constant, or None."""
    scale = np.ones((1, cout, 1, 1))
    offset = np.zeros((1, cout, 1, 1))
    passed: list[onnx.NodeProto] = []
    name = y
    while name not in graph_outputs:
        users = g.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in ("Add", "Mul") or len(users[0].input) != 2:
            break
        user = users[0]
        other = user.input[1] if user.input[0] == name else user.input[0]
        value = g.array(other)
        if value is None or value.dtype != np.float32 or value.ndim > 4:
            break
        value = value.astype(np.float64).reshape((1,) * (4 - value.ndim) + value.shape)
        if value.shape[0] != 1 or value.shape[1] not in (1, cout):
            break
        if user.op_type == "Mul":
            if value.shape[2:] != (1, 1):
                break  # a per-texel gain cannot move into the weights
            scale, offset = scale * value, offset * value
        else:
            offset = offset + value
        passed.append(user)
        name = user.output[0]
    if not passed:
        return None
    return scale.reshape(cout), offset.astype(np.float32), name, passed


@dataclass
class _Requant:
    """The elementwise nodes from a ConvTranspose output to the QuantizeLinear that ends
    them (the next quantized layer's input Q), in graph order."""

    nodes: list[onnx.NodeProto]
    q: onnx.NodeProto


def _tail_constant(value: np.ndarray, cout: int, out_hw: tuple[int, int]) -> np.ndarray | None:
    """A float32 Add/Mul operand as 4-d [1, 1|cout, 1|2H, 1|2W], or None if it does not
    broadcast that way against the layer output [N, cout, 2H, 2W]."""
    if value.dtype != np.float32 or value.ndim > 4:
        return None
    value = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if value.shape[0] != 1 or value.shape[1] not in (1, cout):
        return None
    if value.shape[2] not in (1, out_hw[0]) or value.shape[3] not in (1, out_hw[1]):
        return None
    return value


def _requant_tail(
    g: _Graph, y: str, cout: int, out_hw: tuple[int, int], graph_outputs: set[str]
) -> tuple[_Requant | None, str]:
    """Follow ``y`` (a layer output [N, cout, 2H, 2W]) through single-consumer Add/Mul by
    a constant, LeakyRelu, Relu and Clip (constant bounds) to a per-tensor QuantizeLinear.

    Returns:
        (the tail, "") or (None, why there is none).
    """
    nodes: list[onnx.NodeProto] = []
    name = y
    while True:
        users = g.consumers.get(name, [])
        if name in graph_outputs or len(users) != 1:
            return None, "output reaches no QuantizeLinear through single-consumer elementwise ops"
        user = users[0]
        if user.op_type == "QuantizeLinear":
            scale = g.array(user.input[1])
            has_zp = len(user.input) > 2 and bool(user.input[2])
            zp = g.array(user.input[2]) if has_zp else None
            if scale is None or scale.size != 1 or (has_zp and (zp is None or zp.size != 1)):
                return None, "the QuantizeLinear after it has no constant per-tensor scale"
            return _Requant(nodes, user), ""
        if user.op_type not in _TAIL_OPS:
            return None, f"{user.op_type} between its output and the next QuantizeLinear"
        if user.op_type in ("Add", "Mul"):
            other = user.input[1] if user.input[0] == name else user.input[0]
            value = g.array(other)
            if value is None or _tail_constant(value, cout, out_hw) is None:
                return None, f"{user.op_type} after it is not by a broadcastable constant"
        if user.op_type == "Clip" and any(i and i not in g.inits for i in user.input[1:]):
            return None, "Clip after it has computed bounds"
        nodes.append(user)
        name = user.output[0]


def merged_phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> ONE 2x2 conv (pads 1) that computes every phase.

    Args:
        weight: [Cin, Cout, 4, 4] ConvTranspose weights, any dtype.

    Returns:
        [4 * Cout, Cin, 2, 2] (values re-arranged, never changed), phase-major: output
        channel ``(2u + v) * Cout + c`` at window (i, j) of the conv's [H + 1, W + 1] output
        is channel c of output texel (2i - 1 + u, 2j - 1 + v). Channels-last, the output
        [H + 1, W + 1, 2, 2, Cout] read as [H + 1, 2, W + 1, 2, Cout] is the ConvTranspose
        output with one extra texel on every side.
    """
    phases = phase_weights(weight)  # [4, Cout, Cin, 2, 2], index 2a + b = 3 - (2u + v)
    return np.ascontiguousarray(np.concatenate([phases[3 - k] for k in range(4)]))


def _merged_layout(value: np.ndarray, cout: int, hw: tuple[int, int]) -> np.ndarray:
    """A tail constant [1, 1|C, 1|2H, 1|2W] laid out like the merged conv's output
    [1, 4C, H + 1, W + 1] (see `merged_phase_weights`); the positions of texels outside
    the image, which the interleave crops away, repeat the edge values."""
    h, w = hw
    if value.shape[2:] == (1, 1):
        return value if value.shape[1] == 1 else np.tile(value, (1, 4, 1, 1))
    full = np.broadcast_to(value, (1, cout, 2 * h, 2 * w))
    padded = np.pad(full, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    blocks = padded.reshape(cout, h + 1, 2, w + 1, 2)  # c, i, u, j, v
    merged = blocks.transpose(2, 4, 0, 1, 3).reshape(1, 4 * cout, h + 1, w + 1)
    return np.ascontiguousarray(merged)


def _requant_nodes(
    g: _Graph,
    node: onnx.NodeProto,
    weights: _Weights,
    tail: _Requant,
    hw: tuple[int, int],
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """The ``int8`` form of ``node`` and its ``tail``: merged phase Conv -> the tail's nodes
    (constants re-laid to the conv's output) -> the tail's own QuantizeLinear -> the 8-bit
    interleave (`_interleave_8bit`) into that Q's output tensor.

    Returns:
        (nodes replacing ``node``, the tail nodes and Q they absorbed).
    """
    base = node.name or node.output[0]
    cout = weights.float_values.shape[1]
    inputs = [
        node.input[0],
        g.const(f"{base}.phases.weight", merged_phase_weights(weights.float_values)),
    ]
    if len(node.input) > 2 and node.input[2]:
        bias = g.array(node.input[2])
        if bias is None:
            raise AvatarqError(f"ConvTranspose {base}: bias is not an initializer")
        inputs.append(g.const(f"{base}.phases.bias", np.tile(bias.astype(np.float32), 4)))
    t = g.unique(f"{base}.phases")
    nodes = [g.node("Conv", inputs, [t], base, pads=[1, 1, 1, 1], kernel_shape=[2, 2])]
    data = node.output[0]  # the tensor each tail node reads in the original graph
    for op in tail.nodes:
        ins = list(op.input)
        k = ins.index(data)
        ins[k] = t
        if op.op_type in ("Add", "Mul"):
            value = _tail_constant(g.array(ins[1 - k]), cout, (2 * hw[0], 2 * hw[1]))
            ins[1 - k] = g.const(f"{ins[1 - k]}.phases", _merged_layout(value, cout, hw))
        t = g.unique(f"{base}.phases.{op.op_type.lower()}")
        nodes.append(g.node(op.op_type, ins, [t], base, **_attrs(op)))
        data = op.output[0]
    q = g.unique(f"{base}.phases.q")
    nodes.append(g.node("QuantizeLinear", [t, *tail.q.input[1:]], [q], base, **_attrs(tail.q)))
    nodes += _interleave_8bit(g, base, q, cout, hw, tail.q.output[0])
    return nodes, [*tail.nodes, tail.q]


def _interleave_8bit(
    g: _Graph, base: str, q: str, cout: int, hw: tuple[int, int], out: str
) -> list[onnx.NodeProto]:
    """Merged phases [N, 4C, H + 1, W + 1] (8-bit) -> the layer output [N, C, 2H, 2W].

    Channels-last, the interleave is one Transpose of [N, H + 1, W + 1, 2, 2, C] into
    [N, H + 1, 2, W + 1, 2, C], which copies runs of 2C values; a crop drops the extra
    texel on every side. DepthToSpace or Col2Im would shuffle single values instead (and
    Col2Im takes float only, 4x the bytes).
    """
    h, w = hw
    nhwc = g.unique(f"{base}.phases.q.nhwc")
    nodes = [g.node("Transpose", [q], [nhwc], base, perm=[0, 2, 3, 1])]
    blocks = g.unique(f"{base}.blocks")
    shape = g.const(f"{base}.blocks_shape", np.array([0, h + 1, w + 1, 2, 2, cout], np.int64))
    nodes.append(g.node("Reshape", [nhwc, shape], [blocks], base))
    rows = g.unique(f"{base}.interleaved_blocks")
    nodes.append(g.node("Transpose", [blocks], [rows], base, perm=[0, 1, 3, 2, 4, 5]))
    padded = g.unique(f"{base}.interleaved_padded")
    shape = g.const(f"{base}.padded_shape", np.array([0, 2 * h + 2, 2 * w + 2, cout], np.int64))
    nodes.append(g.node("Reshape", [rows, shape], [padded], base))
    crop = g.unique(f"{base}.interleaved_nhwc")
    starts = g.const(f"{base}.crop_starts", np.array([1, 1], np.int64))
    ends = g.const(f"{base}.crop_ends", np.array([2 * h + 1, 2 * w + 1], np.int64))
    axes = g.const(f"{base}.crop_axes", np.array([1, 2], np.int64))
    nodes.append(g.node("Slice", [padded, starts, ends, axes], [crop], base))
    nodes.append(g.node("Transpose", [crop], [out], base, perm=[0, 3, 1, 2]))
    return nodes


def _float_phase_nodes(
    g: _Graph,
    node: onnx.NodeProto,
    weights: _Weights,
    hw: tuple[int, int],
    graph_outputs: set[str],
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """One merged 2x2 Conv + Col2Im; a following Add/Mul-by-constant tail is folded in
    (per-channel gains into the weights, the sum of the additive terms into one Add)."""
    base = node.name or node.output[0]
    x, y = node.input[0], node.output[0]
    h, w = hw
    cin, cout = weights.float_values.shape[:2]
    weight = col2im_phase_weights(weights.float_values).astype(np.float64)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = g.array(node.input[2])
        if bias is None:
            raise AvatarqError(f"ConvTranspose {base}: bias is not an initializer")
        bias = np.repeat(bias.astype(np.float64), 4)
    tail = _affine_tail(g, y, cout, graph_outputs)
    offset = None
    absorbed: list[onnx.NodeProto] = []
    if tail is not None:
        scale, offset, y, absorbed = tail
        weight *= np.repeat(scale, 4).reshape(-1, 1, 1, 1)
        if bias is not None:
            bias *= np.repeat(scale, 4)
    inputs = [x, g.const(f"{base}.phases.weight", weight.astype(np.float32))]
    if bias is not None:
        inputs.append(g.const(f"{base}.phases.bias", bias.astype(np.float32)))
    phases = g.unique(f"{base}.phases")
    nodes = [g.node("Conv", inputs, [phases], base, pads=[1, 1, 1, 1], kernel_shape=[2, 2])]
    columns = g.unique(f"{base}.columns")
    shape = g.const(f"{base}.columns_shape", np.array([0, 4 * cout, (h + 1) * (w + 1)], np.int64))
    nodes.append(g.node("Reshape", [phases, shape], [columns], base))
    image = g.const(f"{base}.image_shape", np.array([2 * h, 2 * w], np.int64))
    block = g.const(f"{base}.block_shape", np.array([2, 2], np.int64))
    out = y if offset is None or not offset.any() else g.unique(f"{base}.interleaved")
    nodes.append(
        g.node("Col2Im", [columns, image, block], [out], base, pads=[1, 1, 1, 1], strides=[2, 2])
    )
    if out != y:
        nodes.append(g.node("Add", [out, g.const(f"{base}.tail_offset", offset)], [y], base))
    return nodes, absorbed


def _remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing consumes any more."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _fold_weight_dq(model: onnx.ModelProto) -> int:
    """Fold DequantizeLinear(initializers) not feeding a Conv into float initializers.

    ONNX Runtime fuses a weight DQ only into a QLinearConv (DQ -> Conv -> Q); any other
    weight DQ (Gemm without an output Q, float layers) would dequantize on every run.
    """
    g = _Graph(model)
    folded = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        if any(c.op_type == "Conv" for c in g.consumers.get(dq.output[0], [])):
            continue
        found = _dequantize(g, dq)
        if found is None:
            continue
        model.graph.node.remove(dq)
        model.graph.initializer.append(numpy_helper.from_array(found[0], dq.output[0]))
        folded += 1
    if folded:
        _remove_dead(model)
    return folded


def rewrite_file(
    src: str | Path, dst: str | Path, config: OrtRewriteConfig = OrtRewriteConfig()
) -> RewriteResult:
    """`rewrite_for_ort` of the model file ``src``, written to ``dst``."""
    from avatarq.export.onnx_export import save_onnx

    result = rewrite_for_ort(onnx.load(str(src)), config)
    save_onnx(result.model, dst)
    return result
