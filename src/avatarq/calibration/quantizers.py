"""Fake quantization in the form TensorRT and ONNX Q/DQ compute it.

Conventions (all of avatarq uses these; `avatarq.export.qdq` writes the same numbers):

- Symmetric signed b-bit (TensorRT's only integer form): zero point 0, ``q = clamp(round(x
  / s), qmin, qmax)``, ``x_hat = q * s``. Activations use the full signed range
  ``[-2^(b-1), 2^(b-1) - 1]`` ([-128, 127] at 8 bits, what QuantizeLinear saturates to);
  weights use the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` ([-127, 127]) so that
  ``-w`` quantizes to ``-q`` (TensorRT's recommendation). ``s = amax / (2^(b-1) - 1)``.
- Asymmetric unsigned b-bit (ONNX Runtime targets only): ``q = clamp(round(x / s) + zp,
  0, 2^b - 1)``, ``x_hat = (q - zp) * s`` with ``s = (max - min) / (2^b - 1)`` and
  ``zp = clamp(round(-min / s), 0, 2^b - 1)``.
- FP8 E4M3 (``bits="fp8"``, `FloatGrid`): ``x_hat = fp8(clamp(x / s, -448, 448)) * s``,
  rounding to the nearest FP8 value, ties to even (QuantizeLinear with saturate=1);
  ``s = amax / 448``. Symmetric only.
- Integer activations of b < 8 keep the 8-bit container with a clipped range (6 bits:
  [-32, 31]); the ONNX graph clips before QuantizeLinear. Integer weights of b <= 4 bits
  are stored as packed INT4, 5..8 bits in INT8 (see `avatarq.calibration.formats`).
- Weight scales are per output channel (float32 [C] along the output axis) or, with a
  block size B (`WeightLayout`), per block of B input channels: float32 of the weight's
  rank with the input-channel axis shortened to ceil(Cin / B) (ONNX's blocked
  DequantizeLinear layout; one scale per output channel, kernel tap and input block).
- Rounding is half to even (``torch.round``, ``np.rint``, ONNX QuantizeLinear) and the
  division is a true float32 division ``x / s`` as QuantizeLinear specifies.
- Scales are float32 and never below `MIN_SCALE` (a zero scale would make Q divide by 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avatarq.calibration.formats import FP8_MAX
from avatarq.errors import AvatarqError

MIN_SCALE = 1e-12
GRID_CANDIDATES = 80
GRID_STEP = 0.01
GRID_POWER = 2.4
GRID_MAX_VALUES = 1 << 20
RANGE_INITS = ("max", "mean")
MIN_BITS, MAX_BITS = 2, 8
FP8 = "fp8"
WEIGHT_SEARCH_CANDIDATES = 40  # shrink factors 1, 0.99, ... of the weight MSE search


def check_bits(bits: int | str) -> int | str:
    """An integer bit width in 2..8 (8-bit container) or "fp8"."""
    if bits == FP8:
        return bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise AvatarqError(
            f"bits must be an integer in {MIN_BITS}..{MAX_BITS} (8-bit container) or 'fp8', "
            f"got {bits!r}"
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


@dataclass(frozen=True)
class FloatGrid:
    """The FP8 E4M3 (FLOAT8E4M3FN) grid, saturating at +-``qmax``; zero point 0."""

    qmax: float = FP8_MAX

    @property
    def qmin(self) -> float:
        return -self.qmax


Grid = IntRange | FloatGrid


def activation_range(bits: int | str, symmetric: bool = True) -> Grid:
    """[-2^(b-1), 2^(b-1) - 1] (symmetric, int8 container), [0, 2^b - 1] (uint8) or FP8."""
    check_bits(bits)
    if bits == FP8:
        if not symmetric:
            raise AvatarqError("FP8 activations are symmetric only (zero point 0)")
        return FloatGrid()
    if symmetric:
        return IntRange(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return IntRange(0, 2**bits - 1)


def weight_range(bits: int | str) -> Grid:
    """Narrow symmetric range [-(2^(b-1) - 1), 2^(b-1) - 1], or the FP8 grid."""
    check_bits(bits)
    if bits == FP8:
        return FloatGrid()
    q = 2 ** (bits - 1) - 1
    return IntRange(-q, q)


def symmetric_scale(amax: torch.Tensor | float, bits: int | str) -> torch.Tensor:
    """scale = amax / (2^(b-1) - 1) (amax / 448 for FP8), float32, >= MIN_SCALE."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / float(weight_range(bits).qmax)).clamp_min(MIN_SCALE)


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


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """The nearest FLOAT8E4M3FN value (ties to even) of clamp(x, -448, 448), as x's dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    qrange: Grid,
    ste: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` on an
    integer grid, ``fp8(clamp(x / s)) * s`` on the FP8 grid.

    ``scale`` / ``zero_point`` broadcast against ``x`` (a scalar for per-tensor, a shaped
    tensor for per-channel). With ``ste`` the rounding passes gradients straight through,
    and the gradient with respect to ``scale`` is LSQ's.
    """
    if isinstance(qrange, FloatGrid):
        y = x / scale
        q = fp8_round(y)
        if ste:
            q = y.clamp(qrange.qmin, qrange.qmax) + (q - y.clamp(qrange.qmin, qrange.qmax)).detach()
        return q * scale
    rounded = round_ste(x / scale) if ste else torch.round(x / scale)
    q = torch.clamp(rounded + zero_point, qrange.qmin, qrange.qmax)
    return (q - zero_point) * scale


def channel_shape(ndim: int, axis: int) -> list[int]:
    """A broadcast shape with -1 at ``axis`` and 1 elsewhere."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


# ------------------------------------------------------------------ weight scale layouts
@dataclass(frozen=True)
class WeightLayout:
    """Where a weight's scales vary.

    Attributes:
        axis: the output-channel axis (0; 1 for ConvTranspose [Cin, Cout, kH, kW]).
        in_axis: the input-channel axis (1; 0 for ConvTranspose).
        block: 0 for one scale per output channel (float32 [Cout]); B > 0 for one scale per
            block of B input channels, per output channel and kernel tap (float32 with the
            weight's rank, ``in_axis`` shortened to ceil(Cin / B); ONNX's blocked layout).
    """

    axis: int
    in_axis: int
    block: int = 0

    def __post_init__(self) -> None:
        if self.block < 0:
            raise AvatarqError(f"weight block size must be >= 0, got {self.block}")

    @classmethod
    def for_weight(cls, axis: int, ndim: int, block: int = 0) -> WeightLayout:
        """The layout of a weight with output axis ``axis`` (its input axis is the other of 0, 1)."""
        if ndim < 2:
            raise AvatarqError(f"a layer weight has rank >= 2, got {ndim}")
        return cls(axis, 1 - axis, block)

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.block:
            return (weight_shape[self.axis],)
        shape = list(weight_shape)
        shape[self.in_axis] = -(-shape[self.in_axis] // self.block)
        return tuple(shape)

    def expand(self, scale: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """``scale`` (compact) broadcast to the full weight shape (float32)."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not self.block:
            return scale.reshape(channel_shape(len(weight_shape), self.axis)).expand(weight_shape)
        size = weight_shape[self.in_axis]
        full = scale.repeat_interleave(self.block, dim=self.in_axis)
        return full.narrow(self.in_axis, 0, size)

    def amax(self, weight: torch.Tensor) -> torch.Tensor:
        """max |w| per scale entry: float32 of `scale_shape`."""
        return self.reduce(weight.detach().abs().float(), torch.amax)

    def reduce(self, values: torch.Tensor, op: Any) -> torch.Tensor:
        """``op`` (torch.amax, torch.sum: ``op(x, dim=...)``) of a weight-shaped tensor over
        each scale entry's weights (zero-padded to whole blocks): `scale_shape`."""
        if not self.block:
            dims = [d for d in range(values.dim()) if d != self.axis]
            return op(values, dim=dims)
        pad = -values.shape[self.in_axis] % self.block
        if pad:
            pad_shape = list(values.shape)
            pad_shape[self.in_axis] = pad
            values = torch.cat([values, values.new_zeros(pad_shape)], dim=self.in_axis)
        shape = list(values.shape)
        shape[self.in_axis : self.in_axis + 1] = [shape[self.in_axis] // self.block, self.block]
        return op(values.reshape(shape), dim=self.in_axis + 1)


def layer_block(in_channels: int, block: int) -> int:
    """The block size a layer with ``in_channels`` (stored) input channels uses: ``block``
    when it divides them into whole blocks, else 0 (per channel). TensorRT accepts only whole
    blocks ("the quantization axis must divide into whole blocks")."""
    return block if block and in_channels % block == 0 else 0


def _full_scale(scale: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-channel [C] scale viewed along ``axis``, or an already full-rank scale as is."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if scale.dim() == weight.dim():
        return scale
    return scale.view(channel_shape(weight.dim(), axis))


def per_channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """max |w| over every axis but ``axis``: float32 [weight.shape[axis]]."""
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims).float()


def weight_scales(
    weight: torch.Tensor, axis: int, bits: int | str, layout: WeightLayout | None = None
) -> torch.Tensor:
    """Max calibration of a weight: float32 [C] per output channel (``layout`` None or
    per-channel), or the blocked scales of ``layout``."""
    amax = per_channel_amax(weight, axis) if layout is None else layout.amax(weight)
    return symmetric_scale(amax, bits)


def mse_weight_scales(
    weight: torch.Tensor,
    layout: WeightLayout,
    bits: int | str,
    candidates: int = WEIGHT_SEARCH_CANDIDATES,
) -> torch.Tensor:
    """Per scale entry, the shrink (1 - 0.01 i) * amax, i < ``candidates``, whose rounding
    error sum((w - Q(w))^2) over the entry's weights is smallest (the first on ties)."""
    w = weight.detach().float()
    base = symmetric_scale(layout.amax(w), bits)
    grid = weight_range(bits)
    best_scale = base.clone()
    best_err = torch.full_like(base, math.inf)
    for i in range(candidates):
        scale = (base * (1.0 - GRID_STEP * i)).clamp_min(MIN_SCALE)
        full = layout.expand(scale, tuple(w.shape))
        err = (fake_quantize(w, full, 0.0, grid) - w) ** 2
        per_entry = layout.reduce(err, torch.sum)
        better = per_entry < best_err
        best_err = torch.where(better, per_entry, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def as_float_tensor(value: torch.Tensor | np.ndarray | float) -> torch.Tensor:
    """A float32 CPU tensor of ``value`` (a copy of numpy data, never a view of it)."""
    if torch.is_tensor(value):
        return value.detach().cpu().float()
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))


def weight_codes(
    weight: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray, axis: int, bits: int | str
) -> np.ndarray:
    """Round-to-nearest codes of a weight: int8 integers (same shape as ``weight``), or for
    FP8 float32 values that are exact FLOAT8E4M3FN numbers.

    ``scale`` is per output channel ([C] along ``axis``) or full-rank (blocked, already
    expanded, or broadcastable). Computed in float32: ``clamp(rint(w / s), ...)``.
    """
    w = as_float_tensor(weight)
    s = _full_scale(as_float_tensor(scale), w, axis)
    grid = weight_range(bits)
    if isinstance(grid, FloatGrid):
        return fp8_round(w / s).numpy().astype(np.float32)
    q = torch.clamp(torch.round(w / s), grid.qmin, grid.qmax)
    return q.numpy().astype(np.int8)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, axis: int, bits: int) -> np.ndarray:
    """Round-to-nearest integer weights: int8 array, same shape as ``weight``.

    ``q = clamp(rint(w / s_c), -(2^(b-1)-1), 2^(b-1)-1)`` computed in float32, the value
    every consumer (fake-quant model, ONNX export) uses for the ``nearest`` rounding mode.
    """
    return weight_codes(weight, scale, axis, bits)


def dequantize_weight(
    q: np.ndarray | torch.Tensor, scale: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """float32 ``q * s`` (what DequantizeLinear computes); ``axis`` None: one scale; a
    full-rank ``scale`` (expanded blocks) multiplies elementwise."""
    q = as_float_tensor(q)
    s = torch.as_tensor(scale, dtype=torch.float32)
    if axis is None:
        return q * s.reshape(())
    return q * _full_scale(s, q, axis)


# ------------------------------------------------------------------ activation range search
def _power_error(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, r: Grid) -> float:
    return float((fake_quantize(values, scale, zp, r) - values).abs().pow(GRID_POWER).mean())


def search_activation_range(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    bits: int | str,
    symmetric: bool = True,
    candidates: int = GRID_CANDIDATES,
    init: str = "max",
) -> tuple[float, float, float]:
    """POCA's shrinking grid search for a per-tensor activation range.

    Args:
        x: float32 [N, ...] calibration activations, one row per sample.
        mask: broadcastable to ``x``; nonzero marks the positions that count (None: all).
        bits: bit width or "fp8"; symmetric: signed zero-point-0 grid (else unsigned
            asymmetric).
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


def max_activation_range(
    x: torch.Tensor, bits: int | str, symmetric: bool = True
) -> tuple[float, float]:
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
    """alpha such that h(alpha) equals the fractional part of w / s (start at the float value).

    ``scale`` is per channel [C] along ``axis`` or full-rank (expanded blocks)."""
    w = weight.detach().float() / _full_scale(scale, weight, axis)
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
    s = _full_scale(scale, weight, axis)
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
    s = _full_scale(scale, weight, axis)
    floor = torch.floor(weight.detach().float() / s)
    r = weight_range(bits)
    q = torch.clamp(floor + (alpha >= 0).float(), r.qmin, r.qmax)
    return q.detach().cpu().numpy().astype(np.int8)
