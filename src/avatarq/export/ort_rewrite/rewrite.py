"""`rewrite_for_ort`: the ONNX Runtime CPU engine of a decoder graph.

Float graphs: every ConvTranspose(k4, s2, p1) becomes a merged phase Conv + Col2Im
(`float_phase`), the FP32 engine.

Q/DQ graphs: every quantized layer with an exact integer evaluation runs on integer
kernels (`integer`, planned per layer below), bit-identical to the exact evaluation of
the graph (`exact.exact_reference`); float layers of a mixed graph get the float rewrite.
Layer modes, recorded per layer in `RewriteResult.layers`:

- ``int8``: MatMulIntegerToFloat on 8-bit channels-last data; the graph's own bias,
  texel bias, activation and next QuantizeLinear follow on the rescaled float values.
  A layer whose output reaches no QuantizeLinear (the texture layer) writes its image
  with Col2Im, a following chain of Add/Mul by constants folded in: nothing requantizes
  it, so its ulp-level differences stay ulp-level.
- ``float``: the exact form on float kernels (integer-valued float32 sums, exact), for
  layers listed in `OrtRewriteConfig.float_layers` or without an integer kernel here
  (a ConvTranspose that is not k4 s2 p1).
- ``kept``: no exact integer evaluation (`QuantLayer.problem`): left as the graph has it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from avatarq.core.documents import known_fields
from avatarq.errors import AvatarqError
from avatarq.export.ort_rewrite.engine import (
    LayerPlan,
    build_int8,
    quantize_before_resize,
    unsigned_activations,
)
from avatarq.export.ort_rewrite.float_phase import float_weights, not_k4s2p1, rewrite_float_layer
from avatarq.export.ort_rewrite.graph import (
    MS_DOMAIN,
    Builder,
    remove_dead,
    set_output,
    spatial,
    to_ir,
    to_proto,
)
from avatarq.export.ort_rewrite.integer import GEMM_OP
from avatarq.export.ort_rewrite.layers import QuantLayer, find_layers

REWRITE_VERSION = 3
MODES = ("int8", "float", "kept")


@dataclass(frozen=True)
class OrtRewriteConfig:
    """How `rewrite_for_ort` treats the graph.

    Attributes:
        integer: run quantized layers on integer kernels (False: leave them as the graph
            has them and rewrite float ConvTranspose layers only).
        float_layers: quantized layers (by name, e.g. ``dec.texture_decoder.upsample.3
            .conv2.deconv``) to run in float (exact form) although an integer kernel exists.
        version: schema version of this config.
    """

    integer: bool = True
    float_layers: tuple[str, ...] = ()
    version: int = REWRITE_VERSION

    def __post_init__(self) -> None:
        if self.version != REWRITE_VERSION:
            raise AvatarqError(
                f"ORT rewrite config version {self.version} is not supported "
                f"(expected {REWRITE_VERSION})"
            )
        if isinstance(self.float_layers, str) or not all(
            isinstance(n, str) for n in self.float_layers
        ):
            raise AvatarqError(
                f"float_layers must be a list of layer names, got {self.float_layers!r}"
            )
        object.__setattr__(self, "float_layers", tuple(self.float_layers))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrtRewriteConfig:
        return cls(**known_fields(cls, data, "ORT rewrite option"))


@dataclass(frozen=True)
class LayerRewrite:
    """What happened to one layer.

    Attributes:
        node: the layer's name (its weight's name for quantized layers, else the node's).
        op: Conv, ConvTranspose, Gemm or MatMul.
        mode: ``int8`` (integer kernel), ``float`` (float kernel: a float layer's phase
            rewrite, or a quantized layer's exact form) or ``kept`` (unchanged).
        reason: why a layer is not ``int8``, or how an ``int8`` layer ends.
        kernel: the operator that does its multiply-adds in the engine.
    """

    node: str
    op: str
    mode: str
    reason: str = ""
    kernel: str = ""


@dataclass
class RewriteResult:
    """The rewritten model and one `LayerRewrite` per layer (graph order)."""

    model: onnx.ModelProto
    layers: list[LayerRewrite] = field(default_factory=list)

    def count(self, mode: str) -> int:
        return sum(layer.mode == mode for layer in self.layers)

    @property
    def n_int8(self) -> int:
        return self.count("int8")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers]}


def plan_layer(layer: QuantLayer, config: OrtRewriteConfig) -> LayerPlan:
    """The mode of one quantized layer (see the module docstring)."""
    if layer.problem:
        return LayerPlan(layer, "kept", layer.problem)
    if layer.name in config.float_layers:
        return LayerPlan(layer, "float", "listed in float_layers")
    if layer.op != "ConvTranspose":
        return LayerPlan(layer, "int8")
    why = not_k4s2p1(layer.node) or ("" if spatial(layer.node.inputs[0]) else "unknown size")
    if why:
        return LayerPlan(layer, "float", f"no integer kernel for this ConvTranspose ({why})")
    if not reaches_quantizer(layer.node.outputs[0]):
        return LayerPlan(layer, "int8-image", "output layer: float tail folded in, Col2Im")
    return LayerPlan(layer, "int8")


def reaches_quantizer(value: ir.Value) -> bool:
    """Whether any QuantizeLinear depends on ``value``. A layer whose output reaches none
    feeds only float computations, where an ulp of difference stays an ulp."""
    seen: set[ir.Value] = set()
    todo = [value]
    while todo:
        current = todo.pop()
        for user, _ in current.uses():
            if user.op_type == "QuantizeLinear":
                return True
            for out in user.outputs:
                if out not in seen:
                    seen.add(out)
                    todo.append(out)
    return False


def _record(plan: LayerPlan) -> LayerRewrite:
    layer = plan.layer
    integer = plan.mode.startswith("int8")
    kernel = GEMM_OP if integer else layer.op
    if plan.mode == "float" and layer.op == "ConvTranspose" and not not_k4s2p1(layer.node):
        kernel = "Conv"  # its phase convolution
    return LayerRewrite(layer.name, layer.op, "int8" if integer else plan.mode, plan.reason, kernel)


def _float_layers(graph: ir.Graph) -> list[ir.Node]:
    """The ConvTranspose nodes with float32 weight initializers (float layers)."""
    return [n for n in graph if n.op_type == "ConvTranspose" and float_weights(n) is not None]


def _rewrite_float_layers(model, b: Builder, nodes: list[ir.Node]) -> list[LayerRewrite]:
    records = []
    for node in nodes:
        weight = float_weights(node)
        why = not_k4s2p1(node) or ("" if spatial(node.inputs[0]) else "unknown input size")
        name = node.name or str(node.outputs[0].name)
        if why:
            records.append(LayerRewrite(name, "ConvTranspose", "kept", why, "ConvTranspose"))
            continue
        old, new = rewrite_float_layer(b, node, weight)
        if old.is_graph_output():
            set_output(model.graph, old, new)
        old.replace_all_uses_with(new)
        records.append(LayerRewrite(name, "ConvTranspose", "float", "float layer", "Conv"))
    return records


def rewrite_for_ort(
    model: onnx.ModelProto, config: OrtRewriteConfig = OrtRewriteConfig()
) -> RewriteResult:
    """The ONNX Runtime CPU engine of ``model`` (not modified): see the module docstring.

    Inputs, outputs, opset and IR version are kept; the engine adds the ``com.microsoft``
    domain when it uses integer kernels.
    """
    work = to_ir(model)
    b = Builder(work.graph)
    records: list[LayerRewrite] = []
    layers = find_layers(work.graph)
    float_nodes = _float_layers(work.graph)  # before the INT8 walk adds float forms of its own
    if config.integer and any(not layer.problem for layer in layers):
        unsigned_activations(work.graph, b)
        quantize_before_resize(work.graph, b)
        work.graph.sort()
        plans = [plan_layer(layer, config) for layer in find_layers(work.graph)]
        build_int8(work.graph, b, plans)
        records = [_record(plan) for plan in plans]
        if any(plan.mode.startswith("int8") for plan in plans):
            work.graph.opset_imports[MS_DOMAIN] = 1
        remove_dead(work)
    else:
        why = "integer kernels disabled" if not config.integer else ""
        records = [LayerRewrite(q.name, q.op, "kept", q.problem or why, q.op) for q in layers]
    records += _rewrite_float_layers(work, b, float_nodes)
    remove_dead(work)
    out = to_proto(work)
    out.ir_version = model.ir_version
    return RewriteResult(out, records)


def rewrite_file(
    src: str | Path, dst: str | Path, config: OrtRewriteConfig = OrtRewriteConfig()
) -> RewriteResult:
    """`rewrite_for_ort` of the model file ``src``, written to ``dst``."""
    from avatarq.export.onnx_export import save_onnx

    result = rewrite_for_ort(onnx.load(str(src)), config)
    save_onnx(result.model, dst)
    return result
