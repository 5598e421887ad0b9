"""Trace the deployable decoder to ONNX with the dynamo exporter.

The graph has inputs ``z`` float32 [batch, Z] and ``view`` float32 [batch, 3] and outputs
``texture`` float32 [batch, 3, T, T] and ``vertices`` float32 [batch, V, 3]; ``batch`` is
dynamic. With ``fp16=True`` every weight and intermediate tensor is float16 and the graph
casts at its inputs and outputs, so callers always exchange float32.

Weight initializers keep the torch parameter names (``dec.texture_decoder.upsample.0.conv1
.deconv.weight``), which is how `layer_nodes` finds the node of each quantizable layer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from avatarq.errors import AvatarqError, InternalError
from avatarq.models.declaration import declaration_of
from avatarq.models.deploy import DeployableDecoder

OPSET = 19
# ONNX Runtime 1.2x/1.3x load IR <= 10 graphs everywhere; opset 19 needs IR >= 9.
IR_VERSION = 10
INPUT_NAMES = ("z", "view")
OUTPUT_NAMES = ("texture", "vertices")
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class ExportConfig:
    """How the float graph is traced.

    Attributes:
        fp16: float16 weights and activations inside, float32 at the graph's boundary.
        opset: ONNX opset (>= 19 so FP16 Q/DQ scales are legal later).
        max_batch: upper bound of the dynamic batch dimension.
    """

    fp16: bool = False
    opset: int = OPSET
    max_batch: int = 64

    def __post_init__(self) -> None:
        if self.opset < 19:
            raise ValueError(f"opset must be >= 19, got {self.opset}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


class _Float32Boundary(nn.Module):
    """Runs ``decoder`` in ``dtype`` and exchanges float32 with the caller."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder = decoder
        self.dtype = dtype

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texture, vertices = self.decoder(z.to(self.dtype), view.to(self.dtype))
        return texture.float(), vertices.float()


class _Float32BoundaryN(nn.Module):
    """`_Float32Boundary` for a declared decoder: any number of inputs and outputs."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder = decoder
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o.float() for o in self.decoder(*(x.to(self.dtype) for x in inputs)))


def export_onnx(decoder: nn.Module, config: ExportConfig = ExportConfig()) -> onnx.ModelProto:
    """Trace ``decoder`` (left unchanged) and return the ONNX model in memory.

    A DAM's `DeployableDecoder` gives inputs z, view and outputs texture, vertices; any
    other decoder is exported by its declaration (`avatarq.models.declaration`): inputs
    and outputs named as declared, the batch dynamic on each.
    """
    import copy

    module = copy.deepcopy(decoder).eval()
    dtype = torch.float16 if config.fp16 else torch.float32
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    if not isinstance(decoder, DeployableDecoder):
        return _export_declared(module, dtype, batch, config)
    wrapped = _Float32Boundary(module.to(dtype), dtype).eval()
    z_dim = decoder.config.z_dim
    example = (torch.zeros(1, z_dim), torch.tensor([[0.0, 0.0, 1.0]]))
    program = traced_program(
        wrapped,
        example,
        {"z": {0: batch}, "view": {0: batch}},
        config.opset,
        list(OUTPUT_NAMES),
    )
    model = program.model_proto
    model.ir_version = IR_VERSION
    model.producer_name = "avatarq"
    names = [i.name for i in model.graph.input]
    if names != list(INPUT_NAMES) or [o.name for o in model.graph.output] != list(OUTPUT_NAMES):
        raise InternalError(
            f"exported graph has inputs {names}, outputs {[o.name for o in model.graph.output]}"
        )
    _strip_wrapper_prefix(model)
    _strip_stack_traces(model)
    return model


def traced_program(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: Any,
    opset: int,
    output_names: list[str],
    input_names: list[str] | None = None,
) -> Any:
    """torch's dynamo ONNX export of ``module`` on ``example`` with its narration and warnings
    silenced (the CLI stays quiet); returns the ONNXProgram. Exceptions propagate."""
    names = {} if input_names is None else {"input_names": input_names}
    sink = io.StringIO()
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                module,
                example,
                dynamo=True,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
                **names,
            )
    finally:
        logging.getLogger("torch.onnx").setLevel(previous)


def _export_declared(
    module: nn.Module, dtype: torch.dtype, batch: Any, config: ExportConfig
) -> onnx.ModelProto:
    """`export_onnx` for a decoder with a declaration (inputs and outputs as declared)."""
    declaration = declaration_of(module)
    wrapped = _Float32BoundaryN(module.to(dtype), dtype).eval()
    example = declaration.example_inputs(1)
    try:
        program = traced_program(
            wrapped,
            example,
            (tuple({0: batch} for _ in example),),
            config.opset,
            list(declaration.outputs),
        )
    except Exception as exc:  # the exporter's own refusal, e.g. an op without an ONNX form
        detail = " ".join(str(exc).split())[:300]
        raise AvatarqError(
            f"the decoder cannot be exported to ONNX ({type(exc).__name__}: {detail})"
        ) from None
    _name_inputs(program.model.graph, declaration.input_names)
    model = program.model_proto
    model.ir_version = IR_VERSION
    model.producer_name = "avatarq"
    names = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if names != list(declaration.input_names) or outputs != list(declaration.outputs):
        raise InternalError(f"exported graph has inputs {names}, outputs {outputs}")
    _strip_wrapper_prefix(model)
    _strip_stack_traces(model)
    return model


def _name_inputs(graph: Any, names: tuple[str, ...]) -> None:
    """Give the graph's inputs (an onnx_ir graph) the declared ``names``; an inner value
    that already holds one of them (``view`` from a reshape) gets a free name first."""
    taken = {v.name for node in graph for v in node.outputs if v.name}
    taken |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in graph:
        for value in node.outputs:
            if value.name in names:
                k = 0
                while f"{value.name}_{k}" in taken:
                    k += 1
                value.name = f"{value.name}_{k}"
                taken.add(value.name)
    for value, name in zip(graph.inputs, names, strict=True):
        value.name = name


def _strip_stack_traces(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node Python stack traces: they hold source-file paths of the
    exporting machine, so the graph's bytes would depend on where avatarq is installed."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _strip_wrapper_prefix(model: onnx.ModelProto) -> None:
    """Rename initializers ``decoder.dec.x`` -> ``dec.x`` so they equal checkpoint names."""
    prefix = "decoder."
    renames = {
        i.name: i.name[len(prefix) :] for i in model.graph.initializer if i.name.startswith(prefix)
    }
    if not renames:
        return
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for value in model.graph.value_info:
        value.name = renames.get(value.name, value.name)


def layer_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Map each quantizable layer's module name to its ONNX node.

    A Conv/ConvTranspose/Gemm/MatMul node belongs to layer ``L`` when its weight input is
    the initializer ``L.weight`` (possibly behind a Cast/Transpose for fp16 or MatMul).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        source = node.input[1]
        while source in producers and producers[source].op_type in (
            "Cast",
            "Transpose",
            "Identity",
        ):
            source = producers[source].input[0]
        if source.endswith(".weight"):
            found[source[: -len(".weight")]] = node
    return found


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path``; weights above 2 GB would go to external data beside it."""
    path = Path(path)
    if model.ByteSize() > 2**31 - 1:
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, path)
