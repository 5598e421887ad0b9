"""Fake quantization in the form TensorRT and ONNX Q/DQ compute it.

Conventions (all of avatarq uses these; `avatarq.export.qdq` writes the same numbers):

- Symmetric signed b-bit (TensorRT's only form): zero point 0, ``q = clamp(round(x / s),
  qmin, qmax)``, ``x_hat = q * s``. Activations use the full signed range
  ``[-2^(b-1), 2^(b-1) - 1]`` ([-128, 127] at 8 bits, what QuantizeLinear saturates to);
  weights use the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` ([-127, 127]) so that
  ``-w`` quantizes to ``-q`` (TensorRT's recommendation). ``s = amax / (2^(b-1) - 1)``.
- Asymmetric unsigned b-bit (ONNX Runtime targets only): ``q = clamp(round(x / s) + zp,
  0, 2^b - 1)``, ``x_hat = (q - zp) * s`` with ``s = (max - min) / (2^b - 1)`` and
  ``zp = clamp(round(-min / s), 0, 2^b - 1)``.
- b < 8 keeps the 8-bit container with a clipped integer range (6 bits: [-32, 31]
  activations, [-31, 31] weights). The ONNX graph clips activations before QuantizeLinear.
- Rounding is half to even (``torch.round``, ``np.rint``, ONNX QuantizeLinear) and the
  division is a true float32 division ``x / s`` as QuantizeLinear specifies.
- Scales are float32 and never below `MIN_SCALE` (a zero scale would make Q divide by 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from avatarq.errors import AvatarqError

MIN_SCALE = 1e-12
GRID_CANDIDATES = 80
GRID_STEP = 0.01
GRID_POWER = 2.4
GRID_MAX_VALUES = 1 << 20
RANGE_INITS = ("max", "mean")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise AvatarqError(
            f"bits must be an integer in {MIN_BITS}..{MAX_BITS} (8-bit container), got {bits!r}"
        )
    return bits


@dataclass(frozen=True)
class IntRange:
    """An integer grid: q in [qmin, qmax], real value (q - zero_point) * scale."""

    qmin: int
    qmax: int

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def activation_range(bits: int, symmetric: bool = True) -> IntRange:
    """[-2^(b-1), 2^(b-1) - 1] (symmetric, int8 container) or [0, 2^b - 1] (uint8)."""
    check_bits(bits)
    if symmetric:
        return IntRange(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return IntRange(0, 2**bits - 1)


def weight_range(bits: int) -> IntRange:
    """Narrow symmetric range [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    check_bits(bits)
    q = 2 ** (bits - 1) - 1
    return IntRange(-q, q)


def symmetric_scale(amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """scale = amax / (2^(b-1) - 1), float32, clamped to >= MIN_SCALE."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / float(2 ** (bits - 1) - 1)).clamp_min(MIN_SCALE)


def asymmetric_params(
    xmin: torch.Tensor | float, xmax: torch.Tensor | float, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point float32 holding an integer) for the uint range [0, 2^b-1].

    The range is widened to include 0 so that 0 is exactly representable (padding zeros
    and ReLU-like outputs stay exact).
    """
    xmin = torch.as_tensor(xmin, dtype=torch.float32).clamp_max(0.0)
    xmax = torch.as_tensor(xmax, dtype=torch.float32).clamp_min(0.0)
    r = activation_range(bits, symmetric=False)
    scale = ((xmax - xmin) / float(r.levels)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(-xmin / scale), r.qmin, r.qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    qrange: IntRange,
    ste: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``.

    ``scale`` / ``zero_point`` broadcast against ``x`` (a scalar for per-tensor, a shaped
    tensor for per-channel). With ``ste`` the rounding passes gradients straight through,
    and the gradient with respect to ``scale`` is LSQ's.
    """
    rounded = round_ste(x / scale) if ste else torch.round(x / scale)
    q = torch.clamp(rounded + zero_point, qrange.qmin, qrange.qmax)
    return (q - zero_point) * scale


def channel_shape(ndim: int, axis: int) -> list[int]:
    """A broadcast shape with -1 at ``axis`` and 1 elsewhere."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def per_channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """max |w| over every axis but ``axis``: float32 [weight.shape[axis]]."""
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims).float()


def weight_scales(weight: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    """Per-output-channel max calibration: float32 [C], C = weight.shape[axis]."""
    return symmetric_scale(per_channel_amax(weight, axis), bits)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, axis: int, bits: int) -> np.ndarray:
    """Round-to-nearest integer weights: int8 array, same shape as ``weight``.

    ``q = clamp(rint(w / s_c), -(2^(b-1)-1), 2^(b-1)-1)`` computed in float32, the value
    every consumer (fake-quant model, ONNX export) uses for the ``nearest`` rounding mode.
    """
    w = weight.detach().float().cpu().numpy()
    s = np.asarray(scale.detach().cpu() if torch.is_tensor(scale) else scale, np.float32)
    s = s.reshape(channel_shape(w.ndim, axis))
    r = weight_range(bits)
    q = np.clip(np.rint(w / s), r.qmin, r.qmax)
    return q.astype(np.int8)


def dequantize_weight(
    q: np.ndarray | torch.Tensor, scale: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """float32 ``q * s_c`` (what DequantizeLinear computes); ``axis`` None: one scale."""
    q = torch.as_tensor(np.asarray(q)).float()
    s = torch.as_tensor(scale, dtype=torch.float32)
    if axis is None:
        return q * s.reshape(())
    return q * s.view(channel_shape(q.dim(), axis))


# ------------------------------------------------------------------ activation range search
def _power_error(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, r: IntRange) -> float:
    return float((fake_quantize(values, scale, zp, r) - values).abs().pow(GRID_POWER).mean())


def search_activation_range(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    bits: int,
    symmetric: bool = True,
    candidates: int = GRID_CANDIDATES,
    init: str = "max",
) -> tuple[float, float, float]:
    """POCA's shrinking grid search for a per-tensor activation range.

    Args:
        x: float32 [N, ...] calibration activations, one row per sample.
        mask: broadcastable to ``x``; nonzero marks the positions that count (None: all).
        bits: bit width; symmetric: signed zero-point-0 grid (else unsigned asymmetric).
        candidates: number of shrunk ranges (1 - 0.01 i) * initial, i = 0..candidates-1.

    The initial range (``init``): "max", the masked max |x| (symmetric) or masked min / max
    (asymmetric) over all samples, so that the first candidate clips nothing (avatarq's
    default); "mean", the mean over samples of the per-sample masked max |x| or min / max,
    as POCA's code initializes from a batch (every candidate then clips the samples whose
    range exceeds the mean).
    The candidate minimizing mean |x_hat - x|^2.4 over the masked values wins (the first on
    ties); beyond `GRID_MAX_VALUES` masked values, a fixed-seed random subset of that size
    is scored.

    Returns:
        (scale, zero_point, loss) of the best candidate, as Python floats.
    """
    if candidates < 1:
        raise AvatarqError(f"the grid search needs at least one candidate, got {candidates}")
    rows = x.detach().reshape(x.shape[0], -1).float()
    seen = torch.ones_like(rows, dtype=torch.bool)
    if mask is not None:
        seen = torch.broadcast_to(mask, x.shape).reshape(x.shape[0], -1) > 0
        if not bool(seen.any()):
            seen = torch.ones_like(rows, dtype=torch.bool)
    if init not in RANGE_INITS:
        raise AvatarqError(f"range init must be one of {RANGE_INITS}, got {init!r}")
    has_any = seen.any(dim=1)
    big = torch.finfo(torch.float32).max

    def reduce(per_sample: torch.Tensor, largest: bool) -> torch.Tensor:
        per_sample = per_sample[has_any]
        if init == "mean":
            return per_sample.mean()
        return per_sample.max() if largest else per_sample.min()

    if symmetric:
        init_max = reduce(torch.where(seen, rows.abs(), torch.zeros(())).amax(dim=1), True)
        init_min = -init_max
    else:
        init_min = reduce(torch.where(seen, rows, torch.full((), big)).amin(dim=1), False)
        init_max = reduce(torch.where(seen, rows, torch.full((), -big)).amax(dim=1), True)
    values = rows[seen]
    if values.numel() > GRID_MAX_VALUES:
        gen = torch.Generator().manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=gen)[:GRID_MAX_VALUES]]
    r = activation_range(bits, symmetric)
    best: tuple[float, float, float] = (1.0, 0.0, math.inf)
    for i in range(candidates):
        shrink = 1.0 - GRID_STEP * i
        if symmetric:
            scale = symmetric_scale(init_max * shrink, bits)
            zp = torch.zeros(())
        else:
            scale, zp = asymmetric_params(init_min * shrink, init_max * shrink, bits)
        loss = _power_error(values, scale, zp, r)
        if loss < best[2]:
            best = (float(scale), float(zp), loss)
    return best


def max_activation_range(x: torch.Tensor, bits: int, symmetric: bool = True) -> tuple[float, float]:
    """Plain max calibration over every value of ``x``: (scale, zero_point)."""
    x = x.detach().float()
    if symmetric:
        return float(symmetric_scale(x.abs().max(), bits)), 0.0
    scale, zp = asymmetric_params(x.min(), x.max(), bits)
    return float(scale), float(zp)


# ------------------------------------------------------------------ AdaRound
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(
        torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0
    )


def adaround_init(weight: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """alpha such that h(alpha) equals the fractional part of w / s (start at the float value)."""
    w = weight.detach().float() / scale.view(channel_shape(weight.dim(), axis))
    rest = (w - torch.floor(w)).clamp(1e-4, 1 - 1e-4)
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1.0)


def adaround_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    axis: int,
    bits: int,
    hard: bool = False,
) -> torch.Tensor:
    """Soft (or hard: h = 1[alpha >= 0]) rounded weights s * clamp(floor(w/s) + h, qmin, qmax)."""
    s = scale.view(channel_shape(weight.dim(), axis))
    floor = torch.floor(weight.detach().float() / s)
    h = (alpha >= 0).float() if hard else rectified_sigmoid(alpha)
    r = weight_range(bits)
    return torch.clamp(floor + h, r.qmin, r.qmax) * s


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(alpha) - 1|^beta): pushes every h to 0 or 1 as beta decreases."""
    return (1.0 - (2.0 * rectified_sigmoid(alpha) - 1.0).abs().pow(beta)).sum()


def adaround_beta(
    step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
):
    """Annealed beta: None during the warm-up (no regularizer), then start -> end linearly."""
    warm = int(warmup * total)
    if step < warm:
        return None
    frac = (step - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - frac)


def adaround_integers(
    weight: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor, axis: int, bits: int
) -> np.ndarray:
    """Hard AdaRound integers: int8, same shape as ``weight``."""
    s = scale.view(channel_shape(weight.dim(), axis))
    floor = torch.floor(weight.detach().float() / s)
    r = weight_range(bits)
    q = torch.clamp(floor + (alpha >= 0).float(), r.qmin, r.qmax)
    return q.detach().cpu().numpy().astype(np.int8)
