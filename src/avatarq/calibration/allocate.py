"""Per-layer bit allocation under a size budget (NeuroQuant-style, solved exactly).

Each quantizable layer l may take one format f of a candidate set (e.g. w8aY, w4aY, fp16);
it then costs size(l, f) bytes (weights in their container, scales, bias) and adds
Omega(l, f) = dw^T H dw to the output error, dw the weight error of f and H the Hessian of
the normalized output loss (`omega`; Hessian-vector products by double backward, never
forming H). Treating the layers' errors as additive, the allocation is the multiple-choice
knapsack

    minimize sum_l Omega(l, f_l)   subject to   sum_l size(l, f_l) + fixed <= budget,

solved EXACTLY by dynamic programming over Pareto fronts (`solve`): after each layer keep
only the partial choices that no other partial choice beats in both size and error (any
optimal allocation's prefix is such a choice, so nothing optimal is pruned). The front is
at most (candidates ^ layers) long and in practice a few hundred entries for the 10-13
layers of a DAM decoder, so no ILP solver (and no scipy dependency) is needed; the test
suite checks the optimum against brute force.

Sizes are the bytes of the graph's initializers (`layer_bytes`, `fixed_bytes`): what
model.onnx holds up to protobuf framing (well under 1%).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from avatarq.calibration.formats import LayerFormat, parse_format
from avatarq.calibration.hadamard import rotated_shape
from avatarq.calibration.layers import LayerInfo, get_layer
from avatarq.errors import AvatarqError

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(mb|bpp)?\s*$", re.IGNORECASE)
MB = 1e6


@dataclass(frozen=True)
class SizeBudget:
    """A size budget: ``value`` megabytes (10^6 bytes) of model initializers, or ``value``
    average stored bits per layer weight ("bpp": weights and their scales only)."""

    value: float
    unit: str  # "MB" or "bpp"

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def parse_size_budget(text: str) -> SizeBudget:
    """ "3.5MB" / "3.5" (megabytes) or "4.5bpp" (bits per layer weight).

    Raises:
        AvatarqError: anything else, or a value <= 0.
    """
    match = _BUDGET.match(str(text))
    if match is None:
        raise AvatarqError(
            f"--size-budget must be megabytes (e.g. 3.5MB) or bits per weight (e.g. 4.5bpp), "
            f"got {text!r}"
        )
    value = float(match.group(1))
    unit = "bpp" if (match.group(2) or "").lower() == "bpp" else "MB"
    if value <= 0:
        raise AvatarqError(f"--size-budget must be > 0, got {text!r}")
    return SizeBudget(value, unit)


def candidate_formats(bits: str) -> list[str]:
    """The formats allocation chooses from for a calibration at ``bits``: fp16, w8aY, w4aY
    and ``bits`` itself (integer), or fp16 and fp8. (w5..w7 cost what w8 costs: same INT8
    container, more error, never chosen.)"""
    fmt = parse_format(bits)
    if fmt.kind == "fp8":
        return ["fp8", "fp16"]
    names = {fmt.name, f"w8a{fmt.act_bits}", f"w4a{fmt.act_bits}", "fp16"}
    return sorted(names, key=lambda n: (parse_format(n).kind != "int", n))


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def layer_bytes(
    info: LayerInfo, fmt: LayerFormat, block: int = 0, rotate: bool = False, bias: bool = True
) -> int:
    """Initializer bytes of one layer in ``fmt``: stored weights (INT4 packed, two per byte),
    their float32 scales (per channel or per block) and the layer's own float32 bias (float16
    in an fp16 layer)."""
    shape = tuple(info.weight_shape)
    if rotate and fmt.quantized:
        shape = rotated_shape(shape, info.input_axis)
    n = _count(shape)
    out_ch = shape[info.weight_axis]
    block = block if block and shape[info.input_axis] % block == 0 else 0
    bias_bytes = out_ch * (2 if fmt.kind == "fp16" else 4) if bias else 0
    if not fmt.quantized:
        return n * fmt.weight_bits_stored // 8 + bias_bytes
    weights = math.ceil(n * fmt.weight_bits_stored / 8)
    if block:
        scale_shape = list(shape)
        scale_shape[info.input_axis] = -(-scale_shape[info.input_axis] // block)
        scales = _count(scale_shape) * 4
    else:
        scales = out_ch * 4
    return weights + scales + bias_bytes


def fixed_bytes(decoder: nn.Module, layers: list[LayerInfo], bias_format: str = "fp32") -> int:
    """Bytes of everything in the graph that allocation does not choose: the texel biases and
    the output offset as ``bias_format`` stores them (`avatarq.calibration.biases`) and the
    other float32 parameters and buffers."""
    from avatarq.calibration.biases import stored_bytes, stored_formats

    layer_params = set()
    for info in layers:
        layer_params.add(f"{info.name}.weight")
        layer_params.add(f"{info.name}.bias")
    formats = stored_formats(decoder, bias_format)
    total = 0
    for name, tensor in list(decoder.named_parameters()) + list(decoder.named_buffers()):
        if name in layer_params:
            continue
        total += stored_bytes(tuple(tensor.shape), formats.get(name, "fp32"))
    return total


@dataclass(frozen=True)
class Allocation:
    """The solver's answer.

    Attributes:
        formats: {layer: format}.
        size: the allocation's size (bytes; bits for a bpp budget), without fixed parts.
        omega: its summed Omega.
        budget: the size available to the layers (same unit).
        front: the largest Pareto front the solver kept (a measure of its work).
        table: {layer: {candidate format: Omega}}.
    """

    formats: dict[str, str]
    size: float
    omega: float
    budget: float
    front: int
    table: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "formats": dict(self.formats),
            "size": self.size,
            "omega": self.omega,
            "budget": self.budget,
            "front": self.front,
            "omega_table": {k: dict(v) for k, v in self.table.items()},
        }


def solve(
    sizes: list[list[float]], costs: list[list[float]], budget: float
) -> tuple[list[int], float, float, int]:
    """Exact multiple-choice knapsack: one choice per row minimizing the summed cost with the
    summed size <= ``budget``. Returns (choice per row, size, cost, largest front).

    Ties are broken deterministically (smaller size, then lexicographically smaller choice).

    Raises:
        AvatarqError: no choice fits the budget.
    """
    if len(sizes) != len(costs) or any(len(a) != len(b) for a, b in zip(sizes, costs, strict=True)):
        raise AvatarqError("sizes and costs must have the same shape")
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    largest = 1
    for row_sizes, row_costs in zip(sizes, costs, strict=True):
        grown = [
            (s + row_sizes[c], cost + row_costs[c], choice + (c,))
            for s, cost, choice in front
            for c in range(len(row_sizes))
            if s + row_sizes[c] <= budget
        ]
        grown.sort(key=lambda t: (t[0], t[1], t[2]))
        front = []
        best = math.inf
        for state in grown:
            if state[1] < best:
                front.append(state)
                best = state[1]
        largest = max(largest, len(front))
        if not front:
            smallest = sum(min(r) for r in sizes)
            raise AvatarqError(
                f"no allocation fits the size budget {budget:.6g}; the smallest possible is "
                f"{smallest:.6g}"
            )
    size, cost, choice = min(front, key=lambda t: (t[1], t[0], t[2]))
    return list(choice), size, cost, largest


def omega(
    decoder: nn.Module,
    info: LayerInfo,
    effective_weight: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    reference: tuple[torch.Tensor, ...] | None = None,
) -> float:
    """Omega = dw^T H dw for dw = effective_weight - w of layer ``info``, H the Hessian of
    sum over outputs of mean((f(w) - F)^2) / var(F) at the FP32 weights (double backward).
    ``inputs``: the decoder's positional inputs (z, view for a DAM)."""
    module = get_layer(decoder, info.name)
    weight = module.weight
    if reference is None:
        with torch.no_grad():
            reference = tuple(t.detach() for t in decoder(*inputs))
    variances = [float(f.double().var(unbiased=False)) or 1.0 for f in reference]
    dw = (effective_weight.float() - weight.detach()).detach()
    w = weight.detach().clone().requires_grad_(True)
    outputs = torch.func.functional_call(decoder, {f"{info.name}.weight": w}, tuple(inputs))
    loss = sum(
        ((o - f) ** 2).mean() / v for o, f, v in zip(outputs, reference, variances, strict=True)
    )
    (grad,) = torch.autograd.grad(loss, w, create_graph=True)
    (hv,) = torch.autograd.grad((grad * dw).sum(), w)
    return float((dw * hv).sum())
