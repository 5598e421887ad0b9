"""Decoder declarations: what a decoder takes and returns, so any module can be deployed.

A *declaration* names a decoder's inputs (name and per-sample shape, fed from the arrays of
the same names in a latent file) and its outputs (in the order the deployed graph returns
them), and says which output is the texture the metrics judge and which, if any, is the
mesh that turns rendering on. Every family avatarq deploys has one:

    Multiface DAM   inputs z [Z], view [3]      outputs texture [3, T, T], vertices [V, 3]
    PiCA-style      inputs z [256], view [3]    outputs texture [3, T, T], vertices [V, 3]
    your own        inputs as declared          outputs as returned (a tensor, tuple or dict)

`DeclaredDecoder` wraps a user's ``nn.Module``: its forward takes the declared inputs
positionally and returns a tuple in the declaration's output order (texture first, then
the mesh when declared, then the others), whatever the module returns (a tensor, a tuple
or a dict). Layers inside keep their module paths prefixed by ``model.``, which is how
calibration entries and ONNX weight initializers name them. `check_ops` traces the module
with ``torch.export`` and refuses the first operator the deployment path cannot carry,
naming the op and the module path it was called from.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avatarq.errors import AvatarqError

DECLARATION_VERSION = 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_INPUT_ELEMENTS = 1 << 24
#: Names a declared input may not take (they label the steps of a latent file).
RESERVED_INPUT_NAMES = ("segment", "frame", "camera")

#: aten operators the deployment path carries (ONNX export, ONNX Runtime and TensorRT, the
#: quantizer around convolutions and linear layers). Anything else is refused by name.
SUPPORTED_OPS = frozenset(
    """
    linear conv1d conv2d conv_transpose2d convolution matmul mm bmm addmm baddbmm
    add sub rsub mul div neg pow sqrt rsqrt reciprocal exp log abs sign clamp clamp_min
    clamp_max clip minimum maximum where sin cos floor ceil round
    relu relu_ leaky_relu leaky_relu_ gelu silu sigmoid tanh elu selu softplus hardtanh
    hardswish hardsigmoid softmax _softmax log_softmax mish prelu
    batch_norm _native_batch_norm_legit_no_training group_norm layer_norm instance_norm
    native_group_norm native_layer_norm
    pixel_shuffle pixel_unshuffle upsample_nearest2d upsample_bilinear2d _upsample_nearest_exact2d
    grid_sampler grid_sampler_2d avg_pool2d max_pool2d adaptive_avg_pool2d
    view reshape _unsafe_view flatten unflatten permute transpose t contiguous clone alias
    cat stack split split_with_sizes chunk slice select narrow squeeze unsqueeze expand
    expand_as repeat flip pad constant_pad_nd reflection_pad2d replication_pad2d
    mean sum amax amin norm linalg_vector_norm
    ones_like zeros_like full_like zeros ones full arange lift_fresh_copy detach _to_copy
    to type_as dropout index_select embedding
    """.split()
)


def _positive_shape(value: Sequence[Any], what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise AvatarqError(f"{what} must be a list of positive integers, got {value!r}") from None
    if not shape or any(d < 1 for d in shape) or any(isinstance(d, bool) for d in value):
        raise AvatarqError(f"{what} must be a list of positive integers, got {list(value)}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise AvatarqError(f"{what} {list(shape)} exceeds {MAX_INPUT_ELEMENTS} values per sample")
    return shape


@dataclass(frozen=True)
class InputSpec:
    """One declared input: ``name`` and its per-sample ``shape`` (float32 [B, *shape])."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise AvatarqError(
                f"input name must be an identifier (letters, digits, _), got {self.name!r}"
            )
        if self.name in RESERVED_INPUT_NAMES:
            raise AvatarqError(
                f"input name {self.name!r} is reserved for the labels of a latent file "
                f"({', '.join(RESERVED_INPUT_NAMES)})"
            )
        object.__setattr__(self, "shape", _positive_shape(self.shape, f"input {self.name} shape"))

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """``NAME:SHAPE`` with SHAPE like ``256`` or ``4x8x8`` (``--input z:256``)."""
        name, sep, shape = str(text).partition(":")
        if not sep or not shape:
            raise AvatarqError(
                f"--input must be NAME:SHAPE (e.g. z:256 or code:4x8x8), got {text!r}"
            )
        parts = shape.lower().replace(",", "x").split("x")
        if not all(p.strip().isdigit() for p in parts):
            raise AvatarqError(
                f"--input {text!r}: the shape must be positive integers joined by x, got {shape!r}"
            )
        return cls(name.strip(), tuple(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in self.shape)}"


@dataclass(frozen=True)
class DecoderDeclaration:
    """What a decoder takes and returns (see the module docstring).

    Attributes:
        arch: the family (``declared`` for a user's module; ``base``... for a DAM; ``pica``).
        inputs: the inputs in the order the decoder's forward takes them.
        outputs: output names in the deployed graph's order: texture first, then the mesh
            when there is one, then the others.
        output_shapes: per-sample shape of each output (same order), from a trial run.
        mesh: whether ``outputs[1]`` is a mesh (float32 [B, V, 3], head-local vertices);
            a mesh turns rendering on.
        texture_output, mesh_output: what the user named (an output's name or its index
            in what the module returns), kept for the record.
    """

    arch: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    mesh: bool = False
    texture_output: str = "0"
    mesh_output: str | None = None
    version: int = DECLARATION_VERSION

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.inputs]
        if not names:
            raise AvatarqError("a decoder declaration needs at least one --input NAME:SHAPE")
        if len(set(names)) != len(names):
            raise AvatarqError(f"input names must be distinct, got {names}")
        if len(self.outputs) != len(self.output_shapes) or not self.outputs:
            raise AvatarqError("a decoder declaration needs one shape per output")
        if len(set(self.outputs)) != len(self.outputs):
            raise AvatarqError(f"output names must be distinct, got {list(self.outputs)}")
        if self.mesh and (len(self.outputs) < 2 or len(self.output_shapes[1]) != 2):
            raise AvatarqError("the mesh output must be vertices [B, V, 3]")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def texture_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the texture output ([C, H, W] for an image)."""
        return self.output_shapes[0]

    @property
    def n_vertices(self) -> int:
        """Vertices of the mesh output (0 without one)."""
        return int(self.output_shapes[1][0]) if self.mesh else 0

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Zeros of every input, except an input ``view`` of shape [3], the front (0, 0, 1)."""
        out = []
        for spec in self.inputs:
            x = torch.zeros(batch, *spec.shape)
            if spec.name == "view" and spec.shape == (3,):
                x[:, 2] = 1.0
            out.append(x)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [{"name": s.name, "shape": list(s.shape)} for s in self.inputs]
        data["outputs"] = list(self.outputs)
        data["output_shapes"] = [list(s) for s in self.output_shapes]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _as_outputs(value: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of what a module returned: a tensor, a tuple/list or a dict."""
    if isinstance(value, torch.Tensor):
        return [("output0", value)]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, tuple | list):
        items = [(f"output{i}", v) for i, v in enumerate(value)]
    else:
        raise AvatarqError(
            f"the decoder returned {type(value).__name__}; it must return a tensor, a tuple or "
            "a dict of tensors"
        )
    for name, v in items:
        if not isinstance(v, torch.Tensor):
            raise AvatarqError(f"decoder output {name} is {type(v).__name__}, not a tensor")
    return items


def _select(items: list[tuple[str, torch.Tensor]], key: str | int, option: str) -> int:
    names = [n for n, _ in items]
    text = str(key)
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit():
        i = int(text)
        if 0 <= i < len(items):
            return i
    raise AvatarqError(
        f"{option} {text!r} names no output; the decoder returns {', '.join(names)} "
        f"(by name, or index 0..{len(items) - 1})"
    )


def _graph_name(name: str) -> str:
    return name if _NAME.match(name) else re.sub(r"\W", "_", name)


class DeclaredDecoder(nn.Module):
    """A user's module run as a deployable decoder: forward(*inputs) -> tuple of outputs.

    Inputs are float32 [B, *shape] in the declaration's order; outputs come back in the
    declaration's order (texture, mesh if declared, the rest), whatever the module returns.
    The module is put in eval mode and its parameters are not trained; it must be
    deterministic and batch-independent (one sample's output does not depend on others).
    """

    def __init__(self, model: nn.Module, declaration: DecoderDeclaration, order: Sequence[int]):
        super().__init__()
        self.model = model.eval()
        self.declaration = declaration
        self.config = declaration  # what calibration records and hashes
        self.denormalized = False
        self._order = tuple(int(i) for i in order)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        items = _as_outputs(self.model(*inputs))
        return tuple(items[i][1] for i in self._order)


def declare(
    model: nn.Module,
    inputs: Sequence[InputSpec | str],
    texture_output: str | int = 0,
    mesh_output: str | int | None = None,
    arch: str = "declared",
    check: bool = True,
) -> DeclaredDecoder:
    """Wrap ``model`` as a `DeclaredDecoder` (the Python API of ``--model file.py:factory``).

    Args:
        model: an ``nn.Module`` whose forward takes the declared inputs positionally.
        inputs: `InputSpec`s or ``NAME:SHAPE`` strings (``"z:256"``), in forward's order.
        texture_output: the output the metrics judge: its name (a dict key) or its index.
        mesh_output: the output holding head-local vertices [B, V, 3] (turns rendering on).
        arch: the family recorded in the bundle.
        check: trace with ``torch.export`` and refuse unsupported operators (`check_ops`).

    Raises:
        AvatarqError: a bad declaration, a module that fails on the declared inputs,
            unknown outputs, a non-finite output, or an unsupported operator.
    """
    if not isinstance(model, nn.Module):
        raise AvatarqError(f"the decoder must be a torch.nn.Module, got {type(model).__name__}")
    specs = tuple(s if isinstance(s, InputSpec) else InputSpec.parse(s) for s in inputs)
    draft = DecoderDeclaration(arch, specs, ("output0",), ((1,),))
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            items = _as_outputs(model(*draft.example_inputs(2)))
    except AvatarqError:
        raise
    except Exception as exc:  # the user's code failed on the declared inputs
        detail = " ".join(str(exc).split())[:300]
        raise AvatarqError(
            f"the decoder fails on inputs {', '.join(str(s) for s in specs)}: "
            f"{type(exc).__name__}: {detail}"
        ) from None
    tex = _select(items, texture_output, "--texture-output")
    order = [tex]
    if mesh_output is not None:
        mesh = _select(items, mesh_output, "--mesh-output")
        if mesh == tex:
            raise AvatarqError("--mesh-output and --texture-output name the same output")
        shape = tuple(items[mesh][1].shape)
        if len(shape) != 3 or shape[2] != 3:
            raise AvatarqError(
                f"--mesh-output {mesh_output!r} must be vertices [B, V, 3], got {list(shape)}"
            )
        order.append(mesh)
    order += [i for i in range(len(items)) if i not in order]
    for name, t in items:
        if t.dim() < 1 or t.shape[0] != 2:
            raise AvatarqError(
                f"decoder output {name} has shape {list(t.shape)}; every output needs the "
                "batch as its first dimension"
            )
        if not torch.isfinite(t).all():
            raise AvatarqError(f"decoder output {name} is not finite on the example inputs")
    outputs = [_graph_name(items[i][0]) for i in order]
    if len(set(outputs)) != len(outputs):
        raise AvatarqError(f"output names {outputs} are not distinct as graph names")
    if items[tex][1].dim() != 4:
        raise AvatarqError(
            f"--texture-output {texture_output!r} must be an image [B, C, H, W], got "
            f"{list(items[tex][1].shape)}"
        )
    declaration = DecoderDeclaration(
        arch,
        specs,
        tuple(outputs),
        tuple(tuple(int(d) for d in items[i][1].shape[1:]) for i in order),
        mesh=mesh_output is not None,
        texture_output=str(texture_output),
        mesh_output=None if mesh_output is None else str(mesh_output),
    )
    decoder = DeclaredDecoder(model, declaration, order)
    if check:
        check_ops(decoder)
    return decoder


def declaration_of(decoder: nn.Module) -> DecoderDeclaration:
    """The declaration of a deployable decoder (a DAM's `DeployableDecoder`, a PiCA decoder
    or a `DeclaredDecoder`)."""
    declaration = getattr(decoder, "declaration", None)
    if not isinstance(declaration, DecoderDeclaration):
        raise AvatarqError(
            f"a {type(decoder).__name__} has no decoder declaration; wrap it with "
            "avatarq.models.declare(module, inputs, texture_output)"
        )
    return declaration


def _module_path(node: Any) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    kind = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", "")
    return str(path), kind


def check_ops(decoder: nn.Module) -> list[str]:
    """Trace ``decoder`` with ``torch.export`` and return the aten operators it runs.

    Raises:
        AvatarqError: the first operator outside `SUPPORTED_OPS`, naming it and the module
            path that called it (``unsupported op aten.sort in model.head (Sorter)``), or a
            module torch.export cannot trace.
    """
    declaration = declaration_of(decoder)
    try:
        program = torch.export.export(decoder, declaration.example_inputs(1))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise AvatarqError(
            f"the decoder cannot be traced with torch.export ({type(exc).__name__}: {detail})"
        ) from None
    ops = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        packet = node.target.overloadpacket.__name__
        ops.append(packet)
        if packet not in SUPPORTED_OPS:
            path, kind = _module_path(node)
            where = f" in {path} ({kind})" if path else (f" in the top module ({kind})")
            raise AvatarqError(
                f"unsupported op aten.{packet}{where}; avatarq deploys convolutions, linear "
                "layers, norms, activations, PixelShuffle, resizes and shape ops"
            )
    return ops


def load_factory(spec: str | Path) -> nn.Module:
    """Import ``path/to/file.py:factory`` and return ``factory()`` (an ``nn.Module``).

    The file runs as a module named after it; its own imports resolve beside it.
    """
    text = str(spec)
    path_text, sep, factory = text.rpartition(":")
    if not sep or not path_text.endswith(".py") or not factory:
        raise AvatarqError(f"--model must be path/to/file.py:factory, got {text!r}")
    path = Path(path_text)
    if not path.is_file():
        raise AvatarqError(f"--model {text}: {path} is not a file")
    if not factory.isidentifier():
        raise AvatarqError(f"--model {text}: {factory!r} is not a Python name")
    name = f"avatarq_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise AvatarqError(f"--model {text}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
        fn = getattr(module, factory, None)
        if not callable(fn):
            raise AvatarqError(f"--model {text}: {path.name} defines no function {factory!r}")
        model = fn()
    except AvatarqError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise AvatarqError(f"--model {text} failed: {type(exc).__name__}: {detail}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    if not isinstance(model, nn.Module):
        raise AvatarqError(
            f"--model {text}: {factory}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
