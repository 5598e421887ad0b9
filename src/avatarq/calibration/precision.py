"""Mixed precision: per-layer sensitivity, bit allocation under a size budget, the plan.

Two sensitivity measures, both "how much does the decoder's output move when this layer
alone is quantized" (max calibration: per-channel weight amax, per-tensor input amax):

- "error": measured. NSR = max over outputs (texture, vertices) of
  mean((Q - F)^2) / var(F), with F the FP32 output and Q the output with only this layer
  quantized (weights and input).
- "omega": NeuroQuant's Omega = dw^T H dw for the weight perturbation dw = Q(w) - w, H the
  Hessian of the same normalized output loss at the FP32 weights, by a Hessian-vector
  product (double backward); never forms H. At the FP32 point H is the Gauss-Newton
  matrix, so Omega ~ 2 x the weight-only NSR.

The plan keeps the ``fp16_budget`` most sensitive layers in FP16 and the rest in the
calibration's format, or (with a size budget) takes the exact allocation of allocate.py;
then the per-layer overrides apply.
"""

from __future__ import annotations

import torch
from torch import nn

from avatarq.calibration.allocate import (
    MB,
    Allocation,
    candidate_formats,
    fixed_bytes,
    layer_bytes,
    omega,
    parse_size_budget,
    solve,
)
from avatarq.calibration.formats import DEFAULT_BITS, LayerFormat, parse_format
from avatarq.calibration.hadamard import rotate_weight, rotation_matrix
from avatarq.calibration.layers import LayerInfo, QuantizedLayer, get_layer, install
from avatarq.calibration.quantizers import (
    WeightLayout,
    activation_range,
    dequantize_weight,
    fake_quantize,
    layer_block,
    max_activation_range,
    mse_weight_scales,
    weight_codes,
    weight_range,
    weight_scales,
)
from avatarq.errors import AvatarqError


def _output_nsr(ref: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> float:
    worst = 0.0
    for f, q in zip(ref, out, strict=True):
        f64, q64 = f.double(), q.double()
        var = float(f64.var(unbiased=False))
        if var > 0:
            worst = max(worst, float(((q64 - f64) ** 2).mean()) / var)
    return worst


def _max_quantized(
    module: nn.Module, info: LayerInfo, x: torch.Tensor, fmt: LayerFormat, symmetric: bool
) -> QuantizedLayer:
    scale, zp = max_activation_range(x, fmt.act_grid, symmetric)
    w_scale = weight_scales(module.weight, info.weight_axis, fmt.weight_grid)
    codes = weight_codes(module.weight, w_scale, info.weight_axis, fmt.weight_grid)
    return QuantizedLayer(
        module,
        fmt.name,
        scale,
        zp,
        activation_range(fmt.act_grid, symmetric),
        torch.from_numpy(codes),
        w_scale,
        info.weight_axis,
    )


@torch.no_grad()
def measured_sensitivity(
    decoder: nn.Module,
    layers: list[LayerInfo],
    *args: torch.Tensor,
    bits: int | str = DEFAULT_BITS,
    symmetric: bool = True,
) -> dict[str, float]:
    """{layer: output NSR with that layer alone max-calibrated to ``bits`` (a format)}.

    One FP32 pass records every layer's input, then one pass per layer with only that
    layer quantized. ``decoder`` is used in place and restored; ``args``: its inputs
    (z [N, Z], view [N, 3] for a DAM).
    """
    fmt = parse_format(bits)
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [get_layer(decoder, i.name).register_forward_hook(keep(i.name)) for i in layers]
    try:
        reference = decoder(*args)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for info in layers:
        module = get_layer(decoder, info.name)
        install(
            decoder, {info.name: _max_quantized(module, info, inputs[info.name], fmt, symmetric)}
        )
        try:
            out[info.name] = _output_nsr(reference, decoder(*args))
        finally:
            install(decoder, {info.name: module})
    return out


def effective_weight(
    weight: torch.Tensor,
    info: LayerInfo,
    fmt: LayerFormat,
    block: int = 0,
    search: str = "max",
    rotate: bool = False,
) -> torch.Tensor:
    """The float32 weight a layer in ``fmt`` computes with, in the layer's own coordinates
    (nearest rounding; a rotated layer's Q(W R^T) R)."""
    w = weight.detach().float()
    if fmt.kind == "fp16":
        return w.half().float()
    if not fmt.quantized:
        return w
    rotation = rotation_matrix(info.in_channels) if rotate else None
    if rotation is not None:
        w = rotate_weight(w, info.input_axis, rotation)
    layout = WeightLayout(
        info.weight_axis, info.input_axis, layer_block(w.shape[info.input_axis], block)
    )
    if search == "mse":
        scale = mse_weight_scales(w, layout, fmt.weight_grid)
    else:
        scale = weight_scales(w, info.weight_axis, fmt.weight_grid, layout)
    full = layout.expand(scale, tuple(w.shape))
    q = fake_quantize(w, full, 0.0, weight_range(fmt.weight_grid))
    if rotation is not None:
        q = rotate_weight(q, info.input_axis, rotation.t())
    return q


def omega_sensitivity(
    decoder: nn.Module,
    layers: list[LayerInfo],
    *args: torch.Tensor,
    bits: int | str = DEFAULT_BITS,
) -> dict[str, float]:
    """{layer: dw^T H dw} with dw the per-channel max-calibrated weight error of that layer
    and H the Hessian of sum over outputs of mean((f(w) - F)^2) / var(F) at the FP32 w."""
    fmt = parse_format(bits)
    with torch.no_grad():
        reference = tuple(t.detach() for t in decoder(*args))
    out: dict[str, float] = {}
    for info in layers:
        weight = get_layer(decoder, info.name).weight
        scale = weight_scales(weight, info.weight_axis, fmt.weight_grid)
        codes = weight_codes(weight, scale, info.weight_axis, fmt.weight_grid)
        approx = dequantize_weight(codes, scale, info.weight_axis)
        out[info.name] = omega(decoder, info, approx, args, reference)
    return out


def allocate_formats(
    decoder: nn.Module,
    layers: list[LayerInfo],
    args: tuple[torch.Tensor, ...],
    config,  # CalibrationConfig
    progress=None,
) -> Allocation:
    """The exact allocation of ``config.size_budget`` over the layers not overridden in
    ``config.precision`` (formats of `candidate_formats`; overridden layers keep theirs).

    Raises:
        AvatarqError: a budget below the smallest allocation (checked before any Omega).
    """
    budget = parse_size_budget(config.size_budget)
    names = candidate_formats(config.bits)
    cands = [parse_format(n) for n in names]
    rotate = bool(config.hadamard)
    bpp = budget.unit == "bpp"

    def size(info: LayerInfo, fmt: LayerFormat) -> float:
        b = layer_bytes(info, fmt, config.weight_block, rotate, bias=not bpp)
        return 8.0 * b if bpp else float(b)

    choices: list[list[LayerFormat]] = []
    for info in layers:
        fixed = config.precision.get(info.name)
        choices.append([parse_format(fixed)] if fixed else cands)
    sizes = [[size(info, f) for f in row] for info, row in zip(layers, choices, strict=True)]
    if bpp:
        total_weights = sum(_numel(info.weight_shape) for info in layers)
        limit = budget.value * total_weights
    else:
        limit = budget.value * MB - fixed_bytes(decoder, layers, config.bias_format)
    smallest = sum(min(r) for r in sizes)
    if smallest > limit:
        need = (
            smallest / _numel_all(layers) if bpp else (smallest + (budget.value * MB - limit)) / MB
        )
        raise AvatarqError(
            f"--size-budget {budget} is below the smallest allocation of these formats "
            f"({', '.join(names)}): {need:.4g}{budget.unit}"
        )
    with torch.no_grad():
        reference = tuple(t.detach() for t in decoder(*args))
    costs: list[list[float]] = []
    for i, (info, row) in enumerate(zip(layers, choices, strict=True)):
        if progress is not None:
            progress("allocating bits (Omega)", i, len(layers))
        weight = get_layer(decoder, info.name).weight
        costs.append(
            [
                omega(
                    decoder,
                    info,
                    effective_weight(
                        weight, info, f, config.weight_block, config.weight_search, rotate
                    ),
                    args,
                    reference,
                )
                if len(row) > 1
                else 0.0
                for f in row
            ]
        )
    choice, used, total, front = solve(sizes, costs, limit)
    formats = {info.name: row[c].name for info, row, c in zip(layers, choices, choice, strict=True)}
    table = {
        info.name: {f.name: c for f, c in zip(row, cost, strict=True)}
        for info, row, cost in zip(layers, choices, costs, strict=True)
    }
    return Allocation(formats, used, total, limit, front, table)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _numel_all(layers: list[LayerInfo]) -> int:
    return sum(_numel(info.weight_shape) for info in layers)


def precision_plan(
    layers: list[LayerInfo],
    sensitivity: dict[str, float] | None,
    fp16_budget: int = 0,
    overrides: dict[str, str] | None = None,
    default: str = DEFAULT_BITS,
) -> dict[str, str]:
    """{layer: format}: the ``fp16_budget`` most sensitive layers (not overridden) in FP16,
    the others in ``default``, then ``overrides`` applied. Ties in sensitivity keep
    execution order."""
    overrides = dict(overrides or {})
    plan = {info.name: default for info in layers}
    if fp16_budget and sensitivity:
        free = [info.name for info in layers if info.name not in overrides]
        ranked = sorted(free, key=lambda name: -sensitivity.get(name, 0.0))
        for name in ranked[:fp16_budget]:
            plan[name] = "fp16"
    plan.update(overrides)
    return plan
