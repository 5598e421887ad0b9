"""The exact evaluation of a Q/DQ graph, as a graph ONNX Runtime runs with float kernels.

ONNX Runtime evaluates ``DequantizeLinear -> ConvTranspose`` in float32: each product
``fl(x * sx) * fl(w * sw)`` and each partial sum is rounded, in an order that depends on
its kernels. A quantized value whose exact pre-quantization value lies within that rounding
error of a rounding boundary comes out one step off, and every later 8-bit layer turns
such a step into further steps. `exact_reference` rewrites every quantized layer that has
an exact integer evaluation (`QuantLayer.problem == ''`) into

    DequantizeLinear(q, 1, zx) -> op(., integer-valued float weights) -> Mul(fl(sx * sw))
        -> Add(bias)

whose float32 sums are integers below 2^24 and therefore exact in any order; the rescale
and the bias are one rounding each. Everything else in the graph is left as it is. The
INT8 engine computes the same values with integer kernels, so the two agree bit for bit.

ONNX Runtime's optimizer must not fold the scale into the weights (ConvMulFusion and
friends): `reference_session` disables those passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from avatarq.export.ort_rewrite.graph import Builder, remove_dead, set_output, to_ir, to_proto
from avatarq.export.ort_rewrite.layers import QuantLayer, find_layers

# ONNX Runtime graph optimizations that would move the rescale or the bias into a layer's
# float weights or accumulation, which would make the exact form inexact again.
EXACT_DISABLED_OPTIMIZERS = (
    "ConvAddFusion",
    "ConvMulFusion",
    "ConvBNFusion",
    "MatMulScaleFusion",
    "MatMulAddFusion",
)


def channel_shape(layer: QuantLayer, n: int) -> tuple[int, ...]:
    """Shape broadcasting a per-output-channel vector of length n against the output."""
    return (1, n, 1, 1) if layer.out_axis == 1 else (n,)


def integer_input(b: Builder, layer: QuantLayer, q: ir.Value | None = None) -> ir.Value:
    """``q - zx`` as exact float32 integers (``q``: the layer's 8-bit input, default
    `QuantLayer.q`)."""
    one = b.const(f"{layer.name}.unit_scale", np.float32(1.0))
    zp = b.const(f"{layer.name}.input_zero_point", layer.x_zero_point)
    return b.op("DequantizeLinear", [q or layer.q, one, zp], f"{layer.name}.integers")


def exact_layer(b: Builder, layer: QuantLayer, q: ir.Value | None = None) -> ir.Value:
    """Emit the exact form of ``layer`` reading the 8-bit input ``q`` (default
    `QuantLayer.q`); returns the value that replaces the layer's output."""
    node = layer.node
    x = integer_input(b, layer, q)
    w = b.const(f"{layer.name}.weight_integers", layer.weight.astype(np.float32))
    attributes = {k: v.value for k, v in node.attributes.items()}
    if node.op_type == "Gemm":
        attributes.pop("beta", None)
    acc = b.op(node.op_type, [x, w], f"{layer.name}.exact", **attributes)
    rescale = layer.rescale.reshape(channel_shape(layer, layer.cout))
    y = b.op("Mul", [acc, b.const(f"{layer.name}.rescale", rescale)], f"{layer.name}.exact")
    if layer.bias is not None:
        bias = layer.bias
        if node.op_type in ("Conv", "ConvTranspose"):
            bias = bias.reshape(channel_shape(layer, layer.cout))
        y = b.op("Add", [y, b.const(f"{layer.name}.exact_bias", bias)], f"{layer.name}.exact")
    return y


def replace_output(layer: QuantLayer, value: ir.Value) -> None:
    """Let every consumer (and graph output) of ``layer``'s output read ``value``."""
    old = layer.node.outputs[0]
    graph = layer.node.graph
    if old.is_graph_output():
        set_output(graph, old, value)
    old.replace_all_uses_with(value)


def exact_reference(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[QuantLayer]]:
    """``model`` with every quantized layer in its exact form (see the module docstring).

    Returns:
        (the exact graph, the quantized layers found; those with a ``problem`` unchanged).
        A graph without quantized layers comes back equal to ``model``.
    """
    work = to_ir(model)
    b = Builder(work.graph)
    layers = find_layers(work.graph)
    for layer in layers:
        if not layer.problem:
            replace_output(layer, exact_layer(b, layer))
    remove_dead(work)
    return to_proto(work), layers
