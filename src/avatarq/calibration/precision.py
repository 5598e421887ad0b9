"""Mixed precision: per-layer sensitivity and the plan of which layers stay FP16.

Two sensitivity measures, both "how much does the decoder's output move when this layer
alone is quantized" (max calibration: per-channel weight amax, per-tensor input amax):

- "error": measured. NSR = max over outputs (texture, vertices) of
  mean((Q - F)^2) / var(F), with F the FP32 output and Q the output with only this layer
  quantized (weights and input).
- "omega": NeuroQuant's Omega = dw^T H dw for the weight perturbation dw = Q(w) - w, H the
  Hessian of the same normalized output loss at the FP32 weights, by a Hessian-vector
  product (double backward); never forms H. At the FP32 point H is the Gauss-Newton
  matrix, so Omega ~ 2 x the weight-only NSR.

The plan keeps the ``fp16_budget`` most sensitive layers in FP16, the rest int8, then
applies the per-layer overrides.
"""

from __future__ import annotations

import torch
from torch import nn

from avatarq.calibration.layers import LayerInfo, QuantizedLayer, get_layer, install
from avatarq.calibration.quantizers import (
    activation_range,
    max_activation_range,
    quantize_weight,
    weight_scales,
)


def _output_nsr(ref: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> float:
    worst = 0.0
    for f, q in zip(ref, out, strict=True):
        f64, q64 = f.double(), q.double()
        var = float(f64.var(unbiased=False))
        if var > 0:
            worst = max(worst, float(((q64 - f64) ** 2).mean()) / var)
    return worst


def _max_quantized(
    module: nn.Module, info: LayerInfo, x: torch.Tensor, bits: int, symmetric: bool
) -> QuantizedLayer:
    scale, zp = max_activation_range(x, bits, symmetric)
    w_scale = weight_scales(module.weight, info.weight_axis, bits)
    w_int = torch.from_numpy(quantize_weight(module.weight, w_scale, info.weight_axis, bits))
    return QuantizedLayer(
        module,
        "int8",
        scale,
        zp,
        activation_range(bits, symmetric),
        w_int,
        w_scale,
        info.weight_axis,
    )


@torch.no_grad()
def measured_sensitivity(
    decoder: nn.Module,
    layers: list[LayerInfo],
    z: torch.Tensor,
    view: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
) -> dict[str, float]:
    """{layer: output NSR with that layer alone max-calibrated to ``bits``}.

    One FP32 pass records every layer's input, then one pass per layer with only that
    layer quantized. ``decoder`` is used in place and restored; z [N, Z], view [N, 3].
    """
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [get_layer(decoder, i.name).register_forward_hook(keep(i.name)) for i in layers]
    try:
        reference = decoder(z, view)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for info in layers:
        module = get_layer(decoder, info.name)
        install(
            decoder, {info.name: _max_quantized(module, info, inputs[info.name], bits, symmetric)}
        )
        try:
            out[info.name] = _output_nsr(reference, decoder(z, view))
        finally:
            install(decoder, {info.name: module})
    return out


def omega_sensitivity(
    decoder: nn.Module,
    layers: list[LayerInfo],
    z: torch.Tensor,
    view: torch.Tensor,
    bits: int = 8,
) -> dict[str, float]:
    """{layer: dw^T H dw} with dw the per-channel max-calibrated weight error of that layer
    and H the Hessian of sum over outputs of mean((f(w) - F)^2) / var(F) at the FP32 w."""
    with torch.no_grad():
        reference = tuple(t.detach() for t in decoder(z, view))
    variances = [float(f.double().var(unbiased=False)) or 1.0 for f in reference]
    out: dict[str, float] = {}
    for info in layers:
        module = get_layer(decoder, info.name)
        weight = module.weight
        scale = weight_scales(weight, info.weight_axis, bits)
        q = torch.from_numpy(quantize_weight(weight, scale, info.weight_axis, bits)).float()
        shape = [1] * weight.dim()
        shape[info.weight_axis] = -1
        dw = (q * scale.view(shape) - weight.detach()).detach()
        w = weight.detach().clone().requires_grad_(True)
        outputs = torch.func.functional_call(decoder, {f"{info.name}.weight": w}, (z, view))
        loss = sum(
            ((o - f) ** 2).mean() / v for o, f, v in zip(outputs, reference, variances, strict=True)
        )
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        (hv,) = torch.autograd.grad((grad * dw).sum(), w)
        out[info.name] = float((dw * hv).sum())
    return out


def precision_plan(
    layers: list[LayerInfo],
    sensitivity: dict[str, float] | None,
    fp16_budget: int = 0,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """{layer: "int8" | "fp16" | "fp32"}: the ``fp16_budget`` most sensitive layers (not
    overridden) in FP16, the others int8, then ``overrides`` applied. Ties in sensitivity
    keep execution order."""
    overrides = dict(overrides or {})
    plan = {info.name: "int8" for info in layers}
    if fp16_budget and sensitivity:
        free = [info.name for info in layers if info.name not in overrides]
        ranked = sorted(free, key=lambda name: -sensitivity.get(name, 0.0))
        for name in ranked[:fp16_budget]:
            plan[name] = "fp16"
    plan.update(overrides)
    return plan
