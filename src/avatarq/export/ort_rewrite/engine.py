"""Build the INT8 engine graph: integer layers, channels-last tensors between them.

`build_int8` walks the graph once, in order:

- a planned integer layer is emitted by `integer` reading its 8-bit input channels-last;
- an elementwise node (the texel-bias Add, LeakyRelu, Clip, the next QuantizeLinear, a
  residual Add, ...) whose input was recomputed in another layout is emitted again in
  that layout, its constants re-laid (`Layouts.constant`): the same float32 operation on
  the same numbers, so every value before a QuantizeLinear equals the exact form's;
- any other node reads its inputs back in NCHW (`Layouts.get`).

Two exact pre-passes make the data integer-friendly: int8 activations with zero point 0
become uint8 with zero point 128 (QuantizeLinear gives q + 128 for the same rounding; each
DequantizeLinear gives the same floats), the form ORT's u8 x s8 GEMM kernels take; and a
QuantizeLinear after a nearest Resize moves in front of it (nearest copies values, so
quantizing first is the same and moves 8-bit data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from avatarq.export.ort_rewrite import integer
from avatarq.export.ort_rewrite.exact import channel_shape, exact_layer, integer_input
from avatarq.export.ort_rewrite.float_phase import follow_affine, not_k4s2p1, phase_conv
from avatarq.export.ort_rewrite.graph import Builder, array, attr, set_output
from avatarq.export.ort_rewrite.layers import QuantLayer
from avatarq.export.ort_rewrite.layout import NCHW, NHWC, PHASES, Layouts
from avatarq.export.ort_rewrite.phases import broadcastable

_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Abs", "Neg", "Identity", "Elu", "Cast")
_BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class LayerPlan:
    """How one quantized layer is computed: see `rewrite.LayerRewrite` for the modes."""

    layer: QuantLayer
    mode: str
    reason: str = ""


# --------------------------------------------------------------------------- pre-passes


def _scalar(value: ir.Value | None) -> np.ndarray | None:
    found = array(value)
    return found if found is not None and found.size == 1 else None


def unsigned_activations(graph: ir.Graph, b: Builder) -> int:
    """int8 per-tensor Q -> DQ pairs with zero point 0 -> uint8 with zero point 128.

    Only a QuantizeLinear whose every consumer is a per-tensor DequantizeLinear with the
    same scale and zero point is changed. Returns the number changed.
    """
    changed = 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        zp, scale = _scalar(q.inputs[2] if len(q.inputs) > 2 else None), _scalar(q.inputs[1])
        if zp is None or scale is None or zp.dtype != np.int8 or zp.reshape(()) != 0:
            continue
        out = q.outputs[0]
        users = [u for u, _ in out.uses()]
        same = all(
            u.op_type == "DequantizeLinear"
            and _scalar(u.inputs[1]) is not None
            and _scalar(u.inputs[1]).reshape(()) == scale.reshape(())
            and _scalar(u.inputs[2] if len(u.inputs) > 2 else None) is not None
            and _scalar(u.inputs[2]).reshape(()) == 0
            for u in users
        )
        if not users or not same or out.is_graph_output():
            continue
        zp128 = b.const(f"{out.name}.zero_point_u8", np.array(128, np.uint8).reshape(zp.shape))
        q.replace_input_with(2, zp128)
        out.dtype = ir.DataType.UINT8
        for u in users:
            u.replace_input_with(2, zp128)
        changed += 1
    return changed


def quantize_before_resize(graph: ir.Graph, b: Builder) -> int:
    """Resize(nearest) -> QuantizeLinear (its only consumer) becomes QuantizeLinear ->
    Resize: the same 8-bit values. Returns the number of pairs moved."""
    moved = 0
    for resize in [n for n in graph if n.op_type == "Resize"]:
        out = resize.outputs[0]
        users = [u for u, _ in out.uses()]
        mode = attr(resize, "mode", "nearest")
        if mode not in ("nearest", b"nearest") or len(users) != 1 or out.is_graph_output():
            continue
        q = users[0]
        if q.op_type != "QuantizeLinear" or _scalar(q.inputs[1]) is None:
            continue
        early = b.op("QuantizeLinear", [resize.inputs[0], *q.inputs[1:]], f"{q.name}.early")
        early.dtype, early.shape = q.outputs[0].dtype, resize.inputs[0].shape
        inputs = [early, *resize.inputs[1:]]
        moved_resize = b.op("Resize", inputs, f"{resize.name}.8bit", **_attributes(resize))
        moved_resize.dtype, moved_resize.shape = early.dtype, q.outputs[0].shape
        q.outputs[0].replace_all_uses_with(moved_resize)
        moved += 1
    return moved


def _attributes(node: ir.Node) -> dict:
    return {k: v.value for k, v in node.attributes.items()}


def exact_phase_conv(b: Builder, layer: QuantLayer, q: ir.Value, hw: tuple[int, int]) -> ir.Value:
    """The exact form of a ConvTranspose(k4, s2, p1) layer on float kernels: the merged
    phase Conv + Col2Im on integer-valued floats (exact sums), then the rescale and bias.
    The Mul follows Col2Im, so no ORT fusion folds it into the weights."""
    x = integer_input(b, layer, q)
    acc = phase_conv(b, x, layer.weight.astype(np.float32), hw, f"{layer.name}.exact")
    rescale = b.const(
        f"{layer.name}.rescale", layer.rescale.reshape(channel_shape(layer, layer.cout))
    )
    y = b.op("Mul", [acc, rescale], f"{layer.name}.exact")
    if layer.bias is not None:
        bias = b.const(
            f"{layer.name}.exact_bias", layer.bias.reshape(channel_shape(layer, layer.cout))
        )
        y = b.op("Add", [y, bias], f"{layer.name}.exact")
    return y


# --------------------------------------------------------------------------- the walk


class _Int8Engine:
    def __init__(self, graph: ir.Graph, b: Builder, plans: list[LayerPlan]) -> None:
        self.graph, self.b = graph, b
        self.layouts = Layouts(b)
        self.plans = {p.layer.node: p for p in plans}
        self.skip: set[ir.Node] = set()

    def run(self) -> None:
        for node in list(self.graph):
            if node in self.skip:
                continue
            plan = self.plans.get(node)
            if plan is not None and plan.mode != "kept":
                self._layer(plan)
            elif not self._relaid(node):
                self._read_nchw(node)
        for value in list(self.graph.outputs):
            if self.layouts.recomputed(value):
                set_output(self.graph, value, self.layouts.get(value, NCHW))

    # ------------------------------------------------------------------ layers

    def _hw(self, value: ir.Value) -> tuple[int, int]:
        shape = self.layouts.shape(value)
        if shape is None:
            raise ValueError(f"spatial size of {value.name} unknown")
        return shape[1], shape[2]

    def _layer(self, plan: LayerPlan) -> None:
        layer, b, lay = plan.layer, self.b, self.layouts
        out = layer.node.outputs[0]
        if plan.mode == "int8" and layer.op == "ConvTranspose":
            x = lay.get(layer.q, NHWC)
            phases, grid = integer.conv_transpose(b, layer, x, self._hw(layer.q))
            lay.add(out, PHASES, phases, grid=grid)
        elif plan.mode == "int8-image":
            tail = follow_affine(out, layer.cout)
            gain = np.ones(layer.cout) if tail is None else tail.gain
            offset = None if tail is None else tail.offset
            x = lay.get(layer.q, NHWC)
            image = integer.conv_transpose_to_image(b, layer, x, self._hw(layer.q), gain, offset)
            self.skip.update([] if tail is None else tail.nodes)
            lay.add(out if tail is None else tail.end, NCHW, image)
        elif plan.mode == "int8" and layer.op == "Conv":
            y, shape = integer.conv(b, layer, lay.get(layer.q, NHWC), self._hw(layer.q))
            lay.add(out, NHWC, y, shape=shape)
        elif plan.mode == "int8":
            lay.add(out, NCHW, integer.matmul(b, layer))
        elif plan.mode == "float" and layer.op == "ConvTranspose" and not not_k4s2p1(layer.node):
            lay.add(
                out, NCHW, exact_phase_conv(b, layer, lay.get(layer.q, NCHW), self._hw(layer.q))
            )
        elif plan.mode == "float":
            lay.add(out, NCHW, exact_layer(b, layer, lay.get(layer.q, NCHW)))
        else:
            raise ValueError(f"unknown layer mode {plan.mode!r}")

    # ------------------------------------------------------------------ elementwise

    def _operands(self, node: ir.Node) -> tuple[list[int], list[int]] | None:
        """(indices of data inputs, indices of constant inputs) of a node that can run in
        another layout, else None."""
        op = node.op_type
        ins = list(node.inputs)
        consts = [i for i, v in enumerate(ins) if v is not None and array(v) is not None]
        data = [i for i, v in enumerate(ins) if v is not None and i not in consts]
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or not data:
            return None
        if op in _UNARY and len(ins) == 1:
            return data, consts
        if op in _BINARY and len(ins) == 2:
            return data, consts
        if op == "Clip" and data == [0] and all(array(v).size == 1 for v in ins[1:] if v):
            return data, consts
        if op in _QDQ and data == [0] and all(array(v).size == 1 for v in ins[1:] if v):
            return data, consts
        if op == "Resize" and data == [0] and "axes" not in node.attributes:
            return data, consts
        return None

    def _relaid(self, node: ir.Node) -> bool:
        """Emit ``node`` again in the layout its recomputed input lives in; False when it
        cannot (then it reads NCHW)."""
        found = self._operands(node)
        if found is None:
            return False
        data, consts = found
        values = [node.inputs[i] for i in data]
        lay = self.layouts
        if not any(lay.recomputed(v) and lay.available(v) - {NCHW} for v in values):
            return False
        if any(lay.shape(v) is None for v in values):
            return False
        grids = {lay.grid(v) for v in values}
        phased = all(PHASES in lay.available(v) for v in values) and len(grids) == 1
        layout = PHASES if phased and node.op_type != "Resize" else NHWC
        if self._identity(node, consts):
            lay.alias(node.outputs[0], node.inputs[data[0]])
            return True
        inputs: list[ir.Value | None] = list(node.inputs)
        for i in consts:
            relaid = self._constant(node, i, layout, values[0])
            if relaid is None:
                return False
            inputs[i] = relaid
        for i in data:
            inputs[i] = lay.get(node.inputs[i], layout)
        new = self.b.op(node.op_type, inputs, node.name or "node", **_attributes(node))
        new.dtype = node.outputs[0].dtype
        grid = lay.grid(values[0]) if layout == PHASES else None
        shape = lay.shape(values[0])
        if node.op_type == "Resize":
            shape = self._resized_shape(node, shape)
        lay.add(node.outputs[0], layout, new, grid=grid, shape=shape)
        return True

    def _identity(self, node: ir.Node, consts: list[int]) -> bool:
        """x + 0, x - 0, 0 + x, x * 1, 1 * x: the same floats (up to the sign of zero, which
        quantizes and compares alike), so they are skipped."""
        if len(consts) != 1 or len(node.inputs) != 2:
            return False
        value = array(node.inputs[consts[0]])
        data = node.inputs[1 - consts[0]]
        shape = self.layouts.shape(data)
        if value.dtype != np.float32 or shape is None or not broadcastable(value, shape):
            return False  # the op could still broadcast its input to a larger shape
        if node.op_type == "Add" or (node.op_type == "Sub" and consts[0] == 1):
            return not value.any()
        if node.op_type == "Mul":
            return bool(np.all(value == 1))
        return False

    def _constant(self, node: ir.Node, i: int, layout: str, like: ir.Value) -> ir.Value | None:
        value = array(node.inputs[i])
        if node.op_type == "Resize":
            if i == 1:
                return node.inputs[i]  # roi: unused by nearest/linear without crop
            if value.size == 0:
                return node.inputs[i]
            if value.size != 4:
                return None
            return self.b.const(f"{node.name}.nhwc", value[[0, 2, 3, 1]])
        if node.op_type in _QDQ or node.op_type == "Clip":
            return node.inputs[i]
        relaid = self.layouts.constant(value, layout, like)
        if relaid is None:
            return None
        if relaid is value:
            return node.inputs[i]
        return self.b.const(f"{node.inputs[i].name}.{layout}", relaid)

    @staticmethod
    def _resized_shape(node: ir.Node, shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
        out = node.outputs[0].shape
        if out is not None and len(out) == 4 and all(isinstance(d, int) for d in out[1:]):
            return (out[1], out[2], out[3])
        scales = array(node.inputs[2]) if len(node.inputs) > 2 else None
        if scales is None or scales.size != 4:
            return None
        return (shape[0], int(shape[1] * scales[2]), int(shape[2] * scales[3]))

    def _read_nchw(self, node: ir.Node) -> None:
        for i, value in enumerate(node.inputs):
            if value is not None and self.layouts.recomputed(value):
                node.replace_input_with(i, self.layouts.get(value, NCHW))


def build_int8(graph: ir.Graph, b: Builder, plans: list[LayerPlan]) -> None:
    """Rewrite ``graph`` in place following ``plans`` (see the module docstring); the nodes
    it replaces are left dead for `graph.remove_dead`."""
    _Int8Engine(graph, b, plans).run()
