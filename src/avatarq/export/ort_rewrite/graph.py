"""Small helpers over onnx-ir for the rewrite: constants, node creation, clean-up."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from avatarq.export.ir_graph import GraphBuilder

MS_DOMAIN = "com.microsoft"


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """An onnx-ir copy of ``model`` with the shapes ONNX shape inference knows."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ModelProto, nodes in topological order, inferred value infos dropped
    (they describe the graph before the rewrite)."""
    model.graph.sort()
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    return proto


def array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer or a Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of ``node`` as a plain Python value (tuples for lists)."""
    found = node.attributes.get(name)
    if found is None:
        return default
    value = found.value
    return tuple(value) if isinstance(value, list | tuple) else value


def attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr(node, name) for name in node.attributes}


def spatial(value: ir.Value) -> tuple[int, int] | None:
    """(H, W) of a 4-d value whose last two dimensions are known integers."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


def channels(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return shape[1]


class Builder(GraphBuilder):
    """Adds initializers and nodes to a graph under names it has not used yet."""

    def op(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        base: str,
        *,
        domain: str = "",
        **attributes: Any,
    ) -> ir.Value:
        """Append ``op_type(inputs)`` and return its (single) output value."""
        node = ir.node(
            op_type,
            inputs,
            attributes=attributes or None,
            domain=domain,
            name=self.unique(f"{base}/{op_type}"),
            num_outputs=1,
        )
        node.outputs[0].name = self.unique(f"{base}.{op_type.lower()}")
        self.graph.append(node)
        return node.outputs[0]


def remove_dead(model: ir.Model) -> None:
    """Drop nodes nothing consumes any more, then unused initializers and opsets."""
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)


def set_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` the graph output ``old`` was, under ``old``'s name."""
    name = old.name
    index = list(graph.outputs).index(old)
    old.name = None
    graph.outputs[index] = new
    new.name = name
    new.dtype, new.shape = old.dtype, old.shape
