"""Float ConvTranspose(k4, s2, p1) layers as one merged phase Conv + Col2Im.

ONNX Runtime's CPU ConvTranspose is a GEMM into a column buffer plus an overlapping
col2im; the merged 2x2 phase Conv runs on its fast NCHWc kernels and Col2Im only moves
each value once (no two blocks overlap). A following chain of Add/Mul by constants (the
texel bias, colour gain, de-normalization) is folded in: per-channel gains into the
weights, the additive terms into one Add (dropped when zero). Float graphs only: this
changes float rounding at the ulp level, which matters only where a quantizer follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from avatarq.export.ort_rewrite.graph import Builder, array, attr, spatial
from avatarq.export.ort_rewrite.phases import as_4d, col2im_phase_weights

_AFFINE = ("Add", "Mul")


def not_k4s2p1(node: ir.Node) -> str:
    """Why ``node`` is not a plain ConvTranspose(k4, s2, p1) ('' when it is one)."""
    checks = [
        (attr(node, "group", 1) != 1, "grouped"),
        (attr(node, "strides", (1, 1)) != (2, 2), f"strides {list(attr(node, 'strides', (1, 1)))}"),
        (attr(node, "pads", (0, 0, 0, 0)) != (1, 1, 1, 1), f"pads {list(attr(node, 'pads', ()))}"),
        (attr(node, "dilations", (1, 1)) != (1, 1), "dilated"),
        (any(attr(node, "output_padding", (0, 0))) or "output_shape" in node.attributes,
         "output padding/shape"),
        (attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"), "auto_pad"),
        (attr(node, "kernel_shape", (4, 4)) != (4, 4), f"kernel {attr(node, 'kernel_shape')}"),
    ]  # fmt: skip
    return next((why for bad, why in checks if bad), "")


@dataclass
class AffineTail:
    """end = y * gain + offset for the nodes passed (gain per channel [C], offset
    broadcasting against [N, C, H, W])."""

    gain: np.ndarray
    offset: np.ndarray
    nodes: list[ir.Node]

    @property
    def end(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


def follow_affine(value: ir.Value, cout: int) -> AffineTail | None:
    """Follow ``value`` [N, C, H, W] through single-consumer Add/Mul by float32 constants
    (per channel or per texel; Mul per channel only). None when not even one is passed."""
    gain, offset = np.ones(cout), np.zeros((1, 1, 1, 1))
    nodes: list[ir.Node] = []
    while not value.is_graph_output():
        users = [u for u, _ in value.uses()]
        if len(users) != 1 or users[0].op_type not in _AFFINE or len(users[0].inputs) != 2:
            break
        user = users[0]
        other = user.inputs[1] if user.inputs[0] is value else user.inputs[0]
        constant = array(other)
        if constant is None or constant.dtype != np.float32 or constant.ndim > 4:
            break
        constant = as_4d(constant).astype(np.float64)
        if constant.shape[:2] not in ((1, 1), (1, cout)):
            break
        if user.op_type == "Mul":
            if constant.shape[2:] != (1, 1):
                break  # a per-texel gain cannot move into the weights
            gain = gain * np.broadcast_to(constant.reshape(-1), (cout,))
            offset = offset * constant
        else:
            offset = offset + constant
        nodes.append(user)
        value = user.outputs[0]
    return AffineTail(gain, offset.astype(np.float32), nodes) if nodes else None


def float_weights(node: ir.Node) -> np.ndarray | None:
    """The float32 [Cin, Cout, 4, 4] weight initializer of ``node``, else None."""
    weight = array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim != 4:
        return None
    return weight


def phase_conv(
    b: Builder,
    x: ir.Value,
    weight: np.ndarray,
    hw: tuple[int, int],
    base: str,
    bias: np.ndarray | None = None,
) -> ir.Value:
    """ConvTranspose(k4, s2, p1) of x [N, Cin, H, W] with ``weight`` [Cin, Cout, 4, 4]
    (float32 values) as the merged phase Conv + Col2Im: [N, Cout, 2H, 2W]."""
    (h, w), cout = hw, weight.shape[1]
    merged = col2im_phase_weights(weight).astype(np.float32)
    inputs = [x, b.const(f"{base}.phases.weight", merged)]
    if bias is not None:
        inputs.append(b.const(f"{base}.phases.bias", np.repeat(bias, 4).astype(np.float32)))
    phases = b.op("Conv", inputs, f"{base}.phases", pads=[1, 1, 1, 1], kernel_shape=[2, 2])
    shape = b.const(f"{base}.columns_shape", np.array([0, 4 * cout, (h + 1) * (w + 1)]))
    columns = b.op("Reshape", [phases, shape], f"{base}.columns")
    image = b.const(f"{base}.image_shape", np.array([2 * h, 2 * w]))
    block = b.const(f"{base}.block_shape", np.array([2, 2]))
    return b.op("Col2Im", [columns, image, block], base, pads=[1, 1, 1, 1], strides=[2, 2])


def rewrite_float_layer(b: Builder, node: ir.Node, weight: np.ndarray) -> tuple[ir.Value, ir.Value]:
    """The merged phase Conv + Col2Im for ``node`` and the affine tail it absorbs.

    Returns:
        (the original value it replaces: the tail's end or the node's output, its new value).
    """
    base = node.name or str(node.outputs[0].name)
    cout = weight.shape[1]
    bias = array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    bias = None if bias is None else bias.astype(np.float64)
    tail = follow_affine(node.outputs[0], cout)
    weight = weight.astype(np.float64)
    if tail is not None:
        weight = weight * tail.gain.reshape(1, -1, 1, 1)
        bias = None if bias is None else bias * tail.gain
    out = phase_conv(b, node.inputs[0], weight, spatial(node.inputs[0]), base, bias)
    if tail is not None and tail.offset.any():
        out = b.op("Add", [out, b.const(f"{base}.tail_offset", tail.offset)], f"{base}.offset")
    return (node.outputs[0] if tail is None else tail.end), out
