"""Editing an onnx-ir graph under names it has not used yet (`GraphBuilder`): the one base
of the Q/DQ insertion (`avatarq.export.qdq`) and the ONNX Runtime rewrite
(`avatarq.export.ort_rewrite`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class GraphBuilder:
    """Adds initializers to ``graph`` under names no initializer, input, node or value of
    it has (``base``, then ``base_1``, ``base_2``, ...)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._names: set[str] = {v.name for v in graph.initializers.values() if v.name}
        self._names |= {v.name for v in graph.inputs if v.name}
        for node in graph.all_nodes():
            if node.name:
                self._names.add(node.name)
            self._names |= {v.name for v in node.outputs if v.name}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(
        self, base: str, value: np.ndarray | np.generic, dtype: ir.DataType | None = None
    ) -> ir.Value:
        """A new initializer holding ``value`` (as ``dtype``; None: its numpy dtype)."""
        name = self.unique(base)
        tensor = ir.tensor(np.asarray(value), dtype=dtype, name=name)
        out = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype))
        out.shape = ir.Shape(tensor.shape)
        self.graph.register_initializer(out)
        return out
