"""Fidelity and temporal stability of an ordered sequence against its FP32 reference.

`SequenceAccumulator` streams frames (F_t, Q_t) in temporal order; `compare_sequences`
does the same on whole sequences; both give a `SequenceComparison` (PSNR, SSIM, tDE, J,
FE per frame and summarized, T-Std of Q and of F) whose truth value is pass/fail against
`Tolerances`. `TemporalStd` is T-Std alone, on one sequence.
Conventions (values in [0, 1], masks, layouts) are those of `avatarq.measure.images`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from avatarq.core.documents import json_float
from avatarq.errors import AvatarqError
from avatarq.measure.images import (
    _as_float64,
    _check_same_shape,
    _mean,
    _sqnorm,
    _ssim64,
    _to_numpy,
    _weights,
    psnr_from_mse,
)
from avatarq.measure.tolerances import Tolerances


def _summary_std(values: np.ndarray) -> float:
    """Population std; 0 when all frames are +inf (identical), inf when only some are."""
    finite = np.isfinite(values)
    if finite.all():
        return float(values.std())
    if np.isnan(values).any():
        return math.nan
    return 0.0 if not finite.any() else math.inf


_ARRAY_FIELDS = (
    "psnr_per_frame",
    "ssim_per_frame",
    "mean_abs_error_per_frame",
    "tde_per_frame",
    "flicker_excess_per_frame",
)


@dataclass(eq=False)
class SequenceComparison:
    """Result of comparing a deployed sequence Q to its FP32 reference F.

    Truthiness is pass/fail against `tolerances` (all pass when none is set); read
    `failures()` for the reasons. Per-frame arrays are float64; "pair" arrays hold one
    value per consecutive pair, index i comparing frames i and i + 1.

    Attributes:
        n_frames: T.
        psnr_per_frame: [T] dB (inf where Q_t == F_t).
        ssim_per_frame: [T], or None when SSIM was not computed.
        mean_abs_error_per_frame: [T] mean |e_t|.
        tde_per_frame: [T - 1] mean |e_{t+1} - e_t|.
        flicker_excess_per_frame: [T - 1] mean |Q_{t+1} - Q_t| - mean |F_{t+1} - F_t|.
        psnr_mean, psnr_min, psnr_std: over frames, dB (std: population, 0 if all inf).
        psnr_all: PSNR of the mean squared error over all frames together, dB.
        ssim_mean: mean SSIM over frames, or None.
        tde: mean of `tde_per_frame`.
        tde_rms: sqrt(mean over pairs of mean (e_{t+1} - e_t)^2).
        jitter_ratio: J in [0, 2]; 0 when the error is identically 0.
        flicker_excess: mean of `flicker_excess_per_frame` (FE).
        max_abs_error: max |e_t| over all frames (and the mask).
        mean_abs_error: mean of `mean_abs_error_per_frame`.
        masked: whether a mask restricted the means.
        tolerances: the thresholds `bool()` checks.
        psnr_all: PSNR of the squared error of all frames together, dB.
        t_std: T-Std of Q (`TemporalStd`): how unevenly the output changes from frame to
            frame; NaN in reports written before it existed.
        t_std_reference: T-Std of F on the same elements; Q == F gives exactly t_std.
    """

    n_frames: int
    psnr_per_frame: np.ndarray
    ssim_per_frame: np.ndarray | None
    mean_abs_error_per_frame: np.ndarray
    tde_per_frame: np.ndarray
    flicker_excess_per_frame: np.ndarray
    psnr_mean: float
    psnr_min: float
    psnr_std: float
    ssim_mean: float | None
    tde: float
    tde_rms: float
    jitter_ratio: float
    flicker_excess: float
    max_abs_error: float
    mean_abs_error: float
    masked: bool
    tolerances: Tolerances = field(default_factory=Tolerances)
    psnr_all: float = math.nan
    t_std: float = math.nan
    t_std_reference: float = math.nan

    def __post_init__(self) -> None:
        if self.tolerances.min_ssim is not None and self.ssim_mean is None:
            raise AvatarqError(
                "tolerance min_ssim is set but SSIM was not computed; "
                "compute it (compute_ssim=True) or drop min_ssim"
            )

    def failures(self) -> list[str]:
        """One line per violated tolerance, e.g. 'psnr_mean 38.2 dB < min_psnr 40 dB'.

        NaN metrics fail every check that applies to them.
        """
        tol, out = self.tolerances, []
        lower = [
            ("psnr_mean", self.psnr_mean, "min_psnr", tol.min_psnr, " dB"),
            ("psnr_min", self.psnr_min, "min_psnr_frame", tol.min_psnr_frame, " dB"),
            ("psnr_all", self.psnr_all, "min_psnr_all", tol.min_psnr_all, " dB"),
            ("ssim_mean", self.ssim_mean, "min_ssim", tol.min_ssim, ""),
        ]
        for name, value, tname, bound, unit in lower:
            if bound is not None and not value >= bound:
                out.append(f"{name} {value:.6g}{unit} < {tname} {bound:g}{unit}")
        upper = [
            ("jitter_ratio", self.jitter_ratio, "max_jitter_ratio", tol.max_jitter_ratio),
            ("tde", self.tde, "max_tde", tol.max_tde),
            ("flicker_excess", self.flicker_excess, "max_flicker_excess", tol.max_flicker_excess),
            ("max_abs_error", self.max_abs_error, "max_abs_error", tol.max_abs_error),
        ]
        for name, value, tname, bound in upper:
            if bound is not None and not value <= bound:
                out.append(f"{name} {value:.6g} > {tname} {bound:g}")
        return out

    def __bool__(self) -> bool:
        return not self.failures()

    def __str__(self) -> str:
        ssim_txt = "" if self.ssim_mean is None else f" SSIM {self.ssim_mean:.4f}"
        verdict = "PASS" if self else "FAIL: " + "; ".join(self.failures())
        return (
            f"T={self.n_frames} PSNR {self.psnr_mean:.2f} dB (min {self.psnr_min:.2f})"
            f"{ssim_txt} tDE {self.tde:.3g} J {self.jitter_ratio:.3f} "
            f"FE {self.flicker_excess:.3g} T-Std {self.t_std:.3g} (FP32 "
            f"{self.t_std_reference:.3g}) max|e| {self.max_abs_error:.3g} {verdict}"
        )

    def gate_values(self) -> dict[str, float]:
        """The metrics gates can test, by canonical gate name (see `GATE_METRICS`)."""
        values = {
            "psnr": self.psnr_mean,
            "psnr_min": self.psnr_min,
            "jitter_ratio": self.jitter_ratio,
            "tde": self.tde,
            "fe": self.flicker_excess,
        }
        if self.ssim_mean is not None:
            values["ssim"] = self.ssim_mean
        return values

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: floats, ints, bools, lists, None; non-finite -> strings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "tolerances":
                out[f.name] = v.to_dict()
            elif f.name in _ARRAY_FIELDS:
                out[f.name] = None if v is None else [json_float(x) for x in v]
            elif isinstance(v, bool | int) or v is None:
                out[f.name] = v
            else:
                out[f.name] = json_float(v)
        out["passed"] = bool(self)
        out["failures"] = self.failures()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequenceComparison:
        """Inverse of `to_dict` (the derived "passed" and "failures" are ignored)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                if f.name in ("psnr_all", "t_std", "t_std_reference"):  # older reports
                    continue
                raise AvatarqError(f"comparison dict lacks field {f.name!r}")
            v = d[f.name]
            if f.name in ("t_std", "t_std_reference"):
                kwargs[f.name] = math.nan if v is None else float(v)
            elif f.name == "tolerances":
                kwargs[f.name] = Tolerances.from_dict(v)
            elif f.name in _ARRAY_FIELDS:
                kwargs[f.name] = None if v is None else np.array([float(x) for x in v])
            elif f.name in ("n_frames", "masked") or v is None:
                kwargs[f.name] = v
            else:
                kwargs[f.name] = float(v)
        return cls(**kwargs)

    def with_tolerances(self, tolerances: Tolerances) -> SequenceComparison:
        """A copy judged against other tolerances (arrays shared, not copied)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["tolerances"] = tolerances
        return SequenceComparison(**kwargs)


class TemporalStd:
    """T-Std of one ordered sequence X_1..X_T, streamed (values in [0, 1], float64).

    With D_t = X_t - X_{t-1} (t = 2..T) and pair weights v_t (the smaller of the two frames'
    mask weights, 1 without a mask), per element p: W(p) = sum_t v_t(p), the weighted
    mean m(p) = sum_t v_t(p) D_t(p) / W(p) and std s(p) = sqrt(sum_t v_t(p) (D_t(p) -
    m(p))^2 / W(p)) (population). T-Std = sum_p W(p) s(p) / sum_p W(p); without a mask the
    plain mean over elements of the std over time of the frame-to-frame change.

    It is 0 for any motion at constant speed and for a frozen output, and grows when the
    output changes unevenly: a quantized latent that holds still and then jumps to the next
    code scores high, the smooth FP32 motion it approximates low. Compare it with the T-Std
    of the FP32 reference on the same frames (`SequenceComparison.t_std_reference`).
    """

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None
        # weighted Welford running sums: W, mean and M2 = sum v (D - mean)^2 per element
        self._w: np.ndarray | float = 0.0
        self._m: np.ndarray | float = 0.0
        self._m2: np.ndarray | float = 0.0
        self.n_frames = 0

    def add(self, frame: np.ndarray, pair_weights: np.ndarray | None = None) -> None:
        """Add X_t (float64); ``pair_weights`` are v_t for the pair (X_{t-1}, X_t)."""
        if self._prev is not None:
            d = frame - self._prev
            v = 1.0 if pair_weights is None else pair_weights
            w = self._w + v
            delta = d - self._m
            step = v / np.where(w > 0, w, 1.0) if pair_weights is not None else v / w
            mean = self._m + step * delta
            self._m2 = self._m2 + v * delta * (d - mean)
            self._w, self._m = w, mean
        self._prev = frame
        self.n_frames += 1

    def result(self) -> float:
        """T-Std of the frames so far (NaN with fewer than 2 frames)."""
        if self.n_frames < 2:
            return math.nan
        w = np.broadcast_to(np.asarray(self._w, np.float64), np.shape(self._m2))
        total = float(w.sum())
        if total == 0.0:
            return math.nan
        var = np.maximum(self._m2, 0.0) / np.where(w > 0, w, 1.0)
        return float(np.vdot(w.ravel(), np.sqrt(var).ravel()) / total)


def temporal_std(frames: Any) -> float:
    """T-Std (`TemporalStd`) of an ordered sequence [T, ...] of frames without a mask."""
    acc = TemporalStd()
    for frame in _frames(frames):
        acc.add(_as_float64(frame, f"frame {acc.n_frames}"))
    if acc.n_frames < 2:
        raise AvatarqError(f"T-Std needs at least 2 frames, got {acc.n_frames}")
    return acc.result()


class SequenceAccumulator:
    """Streaming form of `compare_sequences`: feed frames in temporal order, then `result()`.

    Holds only the previous frame's F, Q and e (float64) besides the running sums, so
    frames can come from a decoder one at a time.

    Args:
        mask: optional static weights broadcastable to every frame.
        compute_ssim: compute SSIM per frame (frames must be [C, H, W] or [H, W]).
    """

    def __init__(self, mask: Any = None, compute_ssim: bool = True) -> None:
        self._static_mask = mask
        self._static_w: np.ndarray | None = None
        self._compute_ssim = compute_ssim
        self._shape: tuple[int, ...] | None = None
        self._prev: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._psnr: list[float] = []
        self._ssim: list[float] = []
        self._mae: list[float] = []
        self._tde: list[float] = []
        self._fe: list[float] = []
        self._diff_sq_mean = 0.0
        self._sq_sum = 0.0
        self._weight_sum = 0.0
        self._j_num = 0.0
        self._j_den = 0.0
        self._max_abs = 0.0
        self._masked = mask is not None
        self._t_std_q = TemporalStd()
        self._t_std_f = TemporalStd()

    def add(self, ref_frame: Any, test_frame: Any, mask: Any = None) -> None:
        """Add frame t: F_t = `ref_frame`, Q_t = `test_frame` (same shape as earlier frames).

        `mask` (weights broadcastable to the frame) overrides the static mask for this
        frame only.
        """
        f = _as_float64(ref_frame, f"ref frame {len(self._psnr)}")
        q = _as_float64(test_frame, f"test frame {len(self._psnr)}")
        _check_same_shape(f, q)
        if self._shape is None:
            self._shape = f.shape
            if self._static_mask is not None:
                self._static_w = _weights(self._static_mask, f.shape)
        elif f.shape != self._shape:
            raise AvatarqError(
                f"frame {len(self._psnr)} has shape {list(f.shape)}, earlier frames "
                f"{list(self._shape)}; all frames of a sequence must have one shape"
            )
        w = self._static_w if mask is None else _weights(mask, f.shape, "frame mask")
        self._masked = self._masked or w is not None
        wsum = float(f.size) if w is None else float(w.sum())
        e = q - f
        abs_e = np.abs(e)
        sq = _sqnorm(e, w)
        self._sq_sum += sq
        self._weight_sum += wsum
        self._psnr.append(psnr_from_mse(sq / wsum))
        self._mae.append(_mean(abs_e, w, wsum))
        frame_max = float(abs_e.max() if w is None else abs_e[w > 0].max())
        del abs_e
        if math.isnan(frame_max) or math.isnan(self._max_abs):
            self._max_abs = math.nan
        else:
            self._max_abs = max(self._max_abs, frame_max)
        if self._compute_ssim:
            self._ssim.append(_ssim64(f, q, w))
        if self._prev is not None:
            self._add_pair(f, q, e, w)
        else:
            self._t_std_f.add(f)
            self._t_std_q.add(q)
        self._prev = (f, q, e, w)

    def _add_pair(self, f: np.ndarray, q: np.ndarray, e: np.ndarray, w: np.ndarray | None) -> None:
        f0, q0, e0, w0 = self._prev
        v = w if w is w0 else np.minimum(w0, w)  # same array for static masks and None
        vsum = float(f.size) if v is None else float(v.sum())
        if vsum == 0.0:
            raise AvatarqError(
                f"masks of frames {len(self._psnr) - 2} and {len(self._psnr) - 1} do not "
                "overlap; temporal metrics need common masked elements"
            )
        self._t_std_f.add(f, v)
        self._t_std_q.add(q, v)
        d = e - e0
        d_sq = _sqnorm(d, v)
        self._tde.append(_mean(np.abs(d, out=d), v, vsum))
        self._diff_sq_mean += d_sq / vsum
        self._j_num += d_sq
        self._j_den += (_sqnorm(e, v) + _sqnorm(e0, v)) / 2
        # mean(|dQ| - |dF|) rather than mean|dQ| - mean|dF|: equal by linearity, and
        # exactly 0 when Q == F whatever the summation order.
        dq = np.abs(np.subtract(q, q0, out=d), out=d)  # reuses d's buffer
        df = np.subtract(f, f0)
        dq -= np.abs(df, out=df)
        self._fe.append(_mean(dq, v, vsum))

    def result(self, tolerances: Tolerances | None = None) -> SequenceComparison:
        """Summary of the frames added so far (at least 2)."""
        t = len(self._psnr)
        if t < 2:
            raise AvatarqError(
                f"temporal metrics need an ordered sequence of at least 2 frames, got {t}"
            )
        psnr_arr = np.array(self._psnr)
        ssim_arr = np.array(self._ssim) if self._compute_ssim else None
        tde_arr, fe_arr = np.array(self._tde), np.array(self._fe)
        mae_arr = np.array(self._mae)
        if self._j_den == 0.0:
            jitter = 0.0 if self._j_num == 0.0 else math.nan
        else:
            jitter = math.sqrt(self._j_num) / math.sqrt(self._j_den)
        return SequenceComparison(
            n_frames=t,
            psnr_per_frame=psnr_arr,
            ssim_per_frame=ssim_arr,
            mean_abs_error_per_frame=mae_arr,
            tde_per_frame=tde_arr,
            flicker_excess_per_frame=fe_arr,
            psnr_mean=float(psnr_arr.mean()),
            psnr_min=float(psnr_arr.min()),
            psnr_std=_summary_std(psnr_arr),
            ssim_mean=None if ssim_arr is None else float(ssim_arr.mean()),
            tde=float(tde_arr.mean()),
            tde_rms=math.sqrt(self._diff_sq_mean / (t - 1)),
            jitter_ratio=jitter,
            flicker_excess=float(fe_arr.mean()),
            max_abs_error=self._max_abs,
            mean_abs_error=float(mae_arr.mean()),
            masked=self._masked,
            tolerances=tolerances if tolerances is not None else Tolerances(),
            psnr_all=psnr_from_mse(self._sq_sum / self._weight_sum),
            t_std=self._t_std_q.result(),
            t_std_reference=self._t_std_f.result(),
        )

    @property
    def n_frames(self) -> int:
        """Frames added so far."""
        return len(self._psnr)


def _frames(x: Any) -> Iterable[Any]:
    """Frames of a [T, ...] array/tensor, or the items of any other iterable."""
    if hasattr(x, "shape") and hasattr(x, "__getitem__"):
        if len(x.shape) == 0:
            raise AvatarqError("a sequence must be [T, ...], got a scalar")
        return (x[i] for i in range(x.shape[0]))
    return iter(x)


def compare_sequences(
    ref: Any,
    test: Any,
    mask: Any = None,
    compute_ssim: bool = True,
    tolerances: Tolerances | None = None,
) -> SequenceComparison:
    """Fidelity and temporal stability of `test` (Q) against the FP32 `ref` (F).

    Args:
        ref, test: ordered sequences [T, ...] of frames (numpy arrays, torch tensors on any
            device, or iterables yielding frames one at a time), T >= 2, floats in
            [0, 1]. Frames are converted to float64 one at a time, so a [64, 3, 1024,
            1024] float32 sequence never exists in float64 as a whole. With
            `compute_ssim`, frames are [C, H, W] or [H, W].
        mask: optional weights, either broadcastable to one frame (static), or [T, ...]
            with one mask per frame (ndim = frame ndim + 1).
        compute_ssim: per-frame SSIM (the costliest metric; off for non-image frames).
        tolerances: what `bool(result)` checks; default checks nothing.

    Returns:
        SequenceComparison with per-frame series and the summary metrics.
    """
    tolerances = tolerances if tolerances is not None else Tolerances()
    if tolerances.min_ssim is not None and not compute_ssim:
        raise AvatarqError("tolerance min_ssim needs SSIM: pass compute_ssim=True")
    m = None if mask is None else _to_numpy(mask)
    acc: SequenceAccumulator | None = None
    per_frame = False
    try:
        for t, (f, q) in enumerate(zip(_frames(ref), _frames(test), strict=True)):
            if acc is None:
                frame_ndim = len(f.shape) if hasattr(f, "shape") else np.ndim(f)
                per_frame = m is not None and m.ndim == frame_ndim + 1
                acc = SequenceAccumulator(None if per_frame else m, compute_ssim)
            if per_frame and t >= m.shape[0]:
                raise AvatarqError(f"per-frame mask has {m.shape[0]} frames, the sequences more")
            acc.add(f, q, m[t] if per_frame else None)
    except ValueError as exc:
        if "zip()" not in str(exc):
            raise
        raise AvatarqError("ref and test sequences have different lengths") from None
    if acc is None:
        raise AvatarqError("temporal metrics need at least 2 frames, got an empty sequence")
    if per_frame and m.shape[0] != acc.n_frames:
        raise AvatarqError(f"per-frame mask has {m.shape[0]} frames, the sequences {acc.n_frames}")
    return acc.result(tolerances)
