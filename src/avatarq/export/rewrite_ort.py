"""Graph rewrite that gives ONNX Runtime's CPU provider a real INT8 decoder.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into an INT8
``QLinearConv`` but has no INT8 ConvTranspose kernel: a Q/DQ ConvTranspose runs in float
with extra Q/DQ work, which makes a plain Q/DQ decoder SLOWER than FP32 on the CPU. This
module rewrites every ConvTranspose(kernel 4, stride 2, pad 1) into stride-1 convolutions
that ONNX Runtime can run in INT8.

The identity (exact, no extra MACs): output phase (a, b) of ConvTranspose(k4, s2, p1), i.e.
the output texels (2m + a, 2k + b), is a 2x2 stride-1 convolution of the input with the
taps ``w[:, :, TAPS[a], TAPS[b]]`` (``TAPS = ((3, 1), (2, 0))``) and pads (top, left,
bottom, right) = (1 - a, 1 - b, a, b). The four phase outputs are interleaved in
channels-last order (Transpose, Concat, Reshape), which ONNX Runtime turns into plain
block copies once it runs the convolutions as NHWC ``QLinearConv``; DepthToSpace, the
obvious interleave, is an element-wise shuffle in ONNX Runtime and costs more than the
INT8 convolutions themselves.

Precision placement of an ``int8`` layer: the input keeps its Q/DQ (re-expressed as uint8
with zero point 128, the same numbers; ONNX Runtime's x86 kernels only fuse uint8
activations), the weights keep the SAME int8 values and per-output-channel scales (only
re-arranged), each phase output is quantized to uint8 with one scale calibrated on sample
inputs (the only new rounding), the interleave moves uint8 data, and the untied texel bias
and LeakyReLU that follow stay in float. Layers with few output channels (the 16 -> 3
output layer) become ``float`` phase convolutions with the dequantized weights (exact with
respect to the Q/DQ graph): ONNX Runtime's INT8 kernel is slow for them. Every other weight
DequantizeLinear (e.g. of a Gemm, which ONNX Runtime does not fuse without an output Q) is
folded into a float initializer: the same values, without dequantizing on every run.

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

REWRITE_VERSION = 1
# Kernel taps of output phase 0 and 1 along one axis, for input rows (m - 1 + p, m + p).
TAPS = ((3, 1), (2, 0))
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))
# int8 q with zero point 0 is the same number as uint8 q + 128 with zero point 128.
_U8_ZERO = 128


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
        min_int8_out_channels: ConvTranspose layers with fewer output channels become float
            phase convolutions (ONNX Runtime's INT8 conv is slow for narrow outputs).
        output_scale_margin: an int8 layer's output scale is
            ``margin * max|y| / 127`` over the calibration inputs (1.0: no headroom).
        calibration_samples: seeded (z, view) samples that calibrate those scales when the
            caller passes none.
        seed: seed of those samples.
        fold_weight_dq: fold weight DequantizeLinear nodes that ONNX Runtime would run on
            every inference (weights of float layers, Gemm) into float initializers.
        version: schema version of this config.
    """

    min_int8_out_channels: int = 8
    output_scale_margin: float = 1.0
    calibration_samples: int = 8
    seed: int = 0
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
        if not self.output_scale_margin >= 1.0:
            raise AvatarqError(
                f"output_scale_margin must be >= 1.0, got {self.output_scale_margin}"
            )
        if self.calibration_samples < 1:
            raise AvatarqError(f"calibration_samples must be >= 1, got {self.calibration_samples}")

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
        mode: ``int8`` (INT8 QLinearConv once ONNX Runtime fuses it), ``float`` (float phase
            convolutions) or ``kept`` (not a rewritable ConvTranspose; unchanged).
        reason: why the layer is ``float`` or ``kept``.
        output_scale: the calibrated output scale of an ``int8`` layer.
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


def _to_uint8(g: _Graph, q: onnx.NodeProto) -> None:
    """Re-express an int8 zero-point-0 Q and its DQs as uint8 with zero point 128 (the
    same numbers); ONNX Runtime's x86 QLinearConv only takes uint8 activations."""
    if g.array(q.input[2]).dtype == np.uint8:
        return
    zp = g.const(f"{q.output[0]}.zero_point_u8", np.array(_U8_ZERO, np.uint8))
    for node in [q, *g.consumers.get(q.output[0], [])]:
        node.input[2] = zp


# --------------------------------------------------------------------------- calibration


def default_calibration_feeds(
    model: onnx.ModelProto, n: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs: N(0, 1) for every input but ``view`` (unit vectors around +z)."""
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


def _max_abs(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> list[float]:
    """max |tensor| over ``feeds`` of each named intermediate tensor (ORT CPU, batch 1)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    n = next(iter(feeds.values())).shape[0]
    peaks = np.zeros(len(names))
    for i in range(n):
        outs = session.run(names, {k: v[i : i + 1] for k, v in feeds.items()})
        peaks = np.maximum(peaks, [float(np.abs(o).max()) for o in outs])
    return peaks.tolist()


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
    model: onnx.ModelProto,
    config: OrtRewriteConfig = OrtRewriteConfig(),
    calibration_feeds: dict[str, np.ndarray] | None = None,
) -> RewriteResult:
    """Rewrite every ConvTranspose(k4, s2, p1) of ``model`` into stride-1 phase convolutions.

    Args:
        model: an ONNX decoder, float or with Q/DQ (not modified; a copy is rewritten). A
            ConvTranspose becomes ``int8`` when its input has a per-tensor Q -> DQ (int8
            with zero point 0, or uint8) and its weight is an int8 symmetric initializer
            behind a DequantizeLinear (per-tensor, or per-output-channel = axis 1), and it
            has at least ``config.min_int8_out_channels`` outputs; other k4/s2/p1 layers
            become ``float`` (exact), anything else is ``kept``.
        config: see `OrtRewriteConfig`.
        calibration_feeds: graph inputs {name: float32 [N, ...]} that calibrate the output
            scales of ``int8`` layers (default: `default_calibration_feeds`).

    Returns:
        `RewriteResult`. Inputs, outputs, opset and IR version are unchanged. A float graph's
        rewrite equals the original up to float rounding (max error ~1e-7 relative).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    sizes = _spatial_sizes(model)
    plans: list[tuple[onnx.NodeProto, _Weights | None, LayerRewrite]] = []
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
            plans.append((node, None, LayerRewrite(node.name, "kept", problem)))
            continue
        cout = weights.float_values.shape[1]
        if weights.int8 is None:
            reason = weights.problem or "float weights"
        elif _activation_q(g, node.input[0]) is None:
            reason = "input has no per-tensor int8/uint8 Q/DQ"
        elif cout < config.min_int8_out_channels:
            reason = f"{cout} output channels < {config.min_int8_out_channels}"
        else:
            reason = ""
        plans.append(
            (node, weights, LayerRewrite(node.name, "float" if reason else "int8", reason))
        )

    int8_outputs = [node.output[0] for node, _, layer in plans if layer.mode == "int8"]
    scales: dict[str, float] = {}
    if int8_outputs:
        feeds = calibration_feeds
        if feeds is None:
            feeds = default_calibration_feeds(model, config.calibration_samples, config.seed)
        peaks = _max_abs(model, int8_outputs, feeds)
        for name, peak in zip(int8_outputs, peaks, strict=True):
            scales[name] = max(peak, 1e-12) * config.output_scale_margin / 127.0

    layers = []
    graph_outputs = {o.name for o in out.graph.output}
    for node, weights, layer in plans:
        scale = scales.get(node.output[0])
        if layer.mode != "kept":
            if scale is not None:
                _to_uint8(g, _activation_q(g, node.input[0]))
            replacement, absorbed = _phase_nodes(
                g, node, weights, scale, sizes[node.input[0]], graph_outputs
            )
            index = list(out.graph.node).index(node)
            for gone in [node, *absorbed]:
                out.graph.node.remove(gone)
            for offset, new in enumerate(replacement):
                out.graph.node.insert(index + offset, new)
        layers.append(LayerRewrite(layer.node, layer.mode, layer.reason, scale))
    _remove_dead(out)
    folded = _fold_weight_dq(out) if config.fold_weight_dq else 0
    return RewriteResult(out, layers, folded)


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


def _phase_nodes(
    g: _Graph,
    node: onnx.NodeProto,
    weights: _Weights,
    out_scale: float | None,
    hw: tuple[int, int],
    graph_outputs: set[str],
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(nodes replacing ``node``, following nodes they absorbed)."""
    if out_scale is None:
        return _float_phase_nodes(g, node, weights, hw, graph_outputs)
    base = node.name or node.output[0]
    x, y = node.input[0], node.output[0]
    cout = weights.float_values.shape[1]
    nodes: list[onnx.NodeProto] = []
    w = phase_weights(weights.int8)
    w_scale = g.const(f"{base}.weight_scale", weights.scale.astype(np.float32))
    w_zp = g.const(f"{base}.weight_zero_point", np.zeros(weights.scale.shape, np.int8))
    y_scale = g.const(f"{base}.output_scale", np.array(out_scale, np.float32))
    y_zp = g.const(f"{base}.output_zero_point", np.array(_U8_ZERO, np.uint8))
    parts = []
    for p, (a, b) in enumerate(PHASES):
        phase = g.unique(f"{base}.phase{a}{b}")
        w_q = g.const(f"{base}.phase{a}{b}.weight_int8", w[p])
        w_in = g.unique(f"{base}.phase{a}{b}.weight")
        nodes.append(g.node("DequantizeLinear", [w_q, w_scale, w_zp], [w_in], base, axis=0))
        pads = list(phase_pads(a, b))
        nodes.append(g.node("Conv", [x, w_in], [phase], base, pads=pads, kernel_shape=[2, 2]))
        q = g.unique(f"{base}.phase{a}{b}.q")
        nodes.append(g.node("QuantizeLinear", [phase, y_scale, y_zp], [q], base))
        parts.append(q)
    interleaved = g.unique(f"{base}.interleaved")
    nodes += _interleave(g, base, parts, cout, hw, interleaved)
    dq_out = y
    if len(node.input) > 2 and node.input[2]:
        dq_out = g.unique(f"{base}.unbiased")
    nodes.append(g.node("DequantizeLinear", [interleaved, y_scale, y_zp], [dq_out], base))
    if dq_out != y:
        bias = g.array(node.input[2])
        if bias is None:
            raise AvatarqError(f"ConvTranspose {base}: bias is not an initializer")
        b = g.const(f"{base}.bias", bias.reshape(1, -1, 1, 1).astype(np.float32))
        nodes.append(g.node("Add", [dq_out, b], [y], base))
    return nodes, []


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


def _interleave(
    g: _Graph, base: str, parts: list[str], cout: int, hw: tuple[int, int], out: str
) -> list[onnx.NodeProto]:
    """Phases [N, C, H, W] in `PHASES` order -> [N, C, 2H, 2W], through channels-last.

    In NHWC order the column interleave copies runs of C values and the row interleave
    runs of 2W * C values, and ONNX Runtime cancels the Transposes against its NHWC
    QLinearConv (or its NCHWc float Conv reorders), so no element-wise shuffle remains.
    """
    h, w = hw
    nodes = []
    axis3 = g.const(f"{base}.axis3", np.array([3], np.int64))
    axis2 = g.const(f"{base}.axis2", np.array([2], np.int64))
    row_shape = g.const(f"{base}.row_shape", np.array([0, h, 2 * w, cout], np.int64))
    out_shape = g.const(f"{base}.nhwc_shape", np.array([0, 2 * h, 2 * w, cout], np.int64))
    rows = []
    for a in (0, 1):
        pair = []
        for b in (0, 1):
            nhwc = g.unique(f"{base}.phase{a}{b}.nhwc")
            nodes.append(g.node("Transpose", [parts[2 * a + b]], [nhwc], base, perm=[0, 2, 3, 1]))
            unsq = g.unique(f"{base}.phase{a}{b}.nhwc1")
            nodes.append(g.node("Unsqueeze", [nhwc, axis3], [unsq], base))
            pair.append(unsq)
        cols = g.unique(f"{base}.row{a}.pairs")  # [N, H, W, 2, C]
        nodes.append(g.node("Concat", pair, [cols], base, axis=3))
        row = g.unique(f"{base}.row{a}")  # [N, H, 2W, C]
        nodes.append(g.node("Reshape", [cols, row_shape], [row], base))
        unsq = g.unique(f"{base}.row{a}.1")
        nodes.append(g.node("Unsqueeze", [row, axis2], [unsq], base))
        rows.append(unsq)
    stacked = g.unique(f"{base}.rows")  # [N, H, 2, 2W, C]
    nodes.append(g.node("Concat", rows, [stacked], base, axis=2))
    nhwc = g.unique(f"{base}.nhwc")
    nodes.append(g.node("Reshape", [stacked, out_shape], [nhwc], base))
    nodes.append(g.node("Transpose", [nhwc], [out], base, perm=[0, 3, 1, 2]))
    return nodes


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
    src: str | Path,
    dst: str | Path,
    config: OrtRewriteConfig = OrtRewriteConfig(),
    calibration_feeds: dict[str, np.ndarray] | None = None,
) -> RewriteResult:
    """`rewrite_for_ort` of the model file ``src``, written to ``dst``."""
    from avatarq.export.onnx_export import save_onnx

    result = rewrite_for_ort(onnx.load(str(src)), config, calibration_feeds)
    save_onnx(result.model, dst)
    return result
