"""Fidelity and temporal-stability metrics of `avatarq bench`, and release gates.

Notation (as in the metrics spec): F_t is the FP32 reference frame t, Q_t the deployed
frame, t = 1..T over an ORDERED sequence, values in [0, 1] (peak 1; nothing is clipped),
e_t = Q_t - F_t. Everything is computed in float64, one frame at a time, whatever the
input dtype (float16/32/64 numpy arrays or torch tensors on any device; integer images
are refused: divide by 255 first).

Masks are non-negative weights broadcastable to a frame (a boolean mask selects
elements): every mean becomes sum(w * x) / sum(w), every squared norm sum(w * x^2), every
max a max over elements with w > 0. A term comparing frames t-1 and t weights by
min(w_{t-1}, w_t) (the intersection for boolean masks).

Image layout for SSIM: channel-first [C, H, W] (the decoder's texture layout), or [H, W].
Rendered images [H, W, C] must be passed as `np.moveaxis(img, -1, 0)` (a view, no copy).
PSNR and the temporal metrics do not depend on the layout.

Non-finite numbers in `to_dict()` output are the strings "Infinity", "-Infinity" and
"NaN" (parsed back by Python's `float()` and JavaScript's `Number()`), so the JSON stays
strict (`json.dumps(..., allow_nan=False)` works).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from avatarq.errors import AvatarqError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
TOLERANCES_VERSION = 1


def _gaussian_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


_GAUSS = _gaussian_1d()


# --------------------------------------------------------------------------- conversion


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_float64(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise AvatarqError(
            f"{name} must be a floating-point image in [0, 1], got dtype {a.dtype}; "
            "convert it first (e.g. x.astype(np.float32) / 255)"
        )
    return np.ascontiguousarray(a, dtype=np.float64)


def _check_same_shape(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise AvatarqError(
            f"ref and test must have the same shape, got {list(ref.shape)} and {list(test.shape)}"
        )


def _weights(mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """float64 C-contiguous weights of `shape` from a mask broadcastable to it."""
    m = _to_numpy(mask)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
        raise AvatarqError(f"{name} must be boolean or numeric, got dtype {m.dtype}")
    try:
        w = np.ascontiguousarray(np.broadcast_to(m.astype(np.float64, copy=False), shape))
    except ValueError:
        raise AvatarqError(
            f"{name} of shape {list(m.shape)} does not broadcast to a frame of shape "
            f"{list(shape)}; give one weight per element, or per pixel as [1, H, W]"
        ) from None
    if not np.isfinite(w).all() or (w < 0).any():
        raise AvatarqError(f"{name} must hold finite non-negative weights")
    if not w.any():
        raise AvatarqError(f"{name} selects nothing (all weights are 0)")
    return w


def _mean(x: np.ndarray, w: np.ndarray | None, wsum: float) -> float:
    if w is None:
        return float(np.mean(x))
    return float(np.vdot(x.ravel(), w.ravel()) / wsum)


def _sqnorm(x: np.ndarray, w: np.ndarray | None) -> float:
    """sum(w * x^2) (plain squared L2 norm without a mask)."""
    flat = x.ravel()
    if w is None:
        return float(np.vdot(flat, flat))
    return float(np.vdot(flat * flat, w.ravel()))


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


# --------------------------------------------------------------------------- per image


def psnr(ref: Any, test: Any, mask: Any = None) -> float:
    """Peak signal-to-noise ratio in dB, peak 1: 10 log10(1 / mean((test - ref)^2)).

    Args:
        ref, test: float arrays of the same shape, any layout, values in [0, 1].
        mask: optional weights broadcastable to `ref` (boolean selects); the mean is
            sum(w e^2) / sum(w).

    Returns:
        float dB; `math.inf` when test equals ref (on the mask).
    """
    r, q = _as_float64(ref, "ref"), _as_float64(test, "test")
    _check_same_shape(r, q)
    w = None if mask is None else _weights(mask, r.shape)
    e = q - r
    return _psnr_from_mse(_sqnorm(e, w) / (e.size if w is None else float(w.sum())))


def _filter_valid(x: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter over the last two axes, 'valid' region only.

    [..., H, W] -> [..., H - 10, W - 10]. matmul on a strided sliding-window view reads
    the image in place (no 11x copy).
    """
    x = sliding_window_view(x, SSIM_WINDOW, axis=-1) @ _GAUSS
    return sliding_window_view(x, SSIM_WINDOW, axis=-2) @ _GAUSS


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM map of float64 [C, H, W] images -> [C, H - 10, W - 10] (Wang et al. 2004).

    In-place arithmetic keeps the working set near 8 maps for a 1024^2 frame.
    """
    mu_x, mu_y = _filter_valid(x), _filter_valid(y)
    sq = np.multiply(x, x)
    var_x = _filter_valid(sq)
    var_y = _filter_valid(np.multiply(y, y, out=sq))
    cov = _filter_valid(np.multiply(x, y, out=sq))
    del sq
    mu_xy = mu_x * mu_y
    mu_xx, mu_yy = np.square(mu_x, out=mu_x), np.square(mu_y, out=mu_y)
    var_x -= mu_xx  # E[x^2] - mu_x^2
    var_y -= mu_yy
    cov -= mu_xy  # E[xy] - mu_x mu_y
    num = mu_xy
    num *= 2
    num += SSIM_C1
    cov *= 2
    cov += SSIM_C2
    num *= cov  # (2 mu_x mu_y + C1)(2 cov + C2)
    den = mu_xx
    den += mu_yy
    den += SSIM_C1
    var_x += var_y
    var_x += SSIM_C2
    den *= var_x  # (mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)
    num /= den
    return num


def _ssim64(r: np.ndarray, q: np.ndarray, w: np.ndarray | None) -> float:
    """SSIM of validated float64 images ([C, H, W] or [H, W]) with full-shape weights."""
    if r.ndim not in (2, 3) or r.shape[-1] < SSIM_WINDOW or r.shape[-2] < SSIM_WINDOW:
        raise AvatarqError(
            f"SSIM needs images [C, H, W] or [H, W] with H, W >= {SSIM_WINDOW}, got "
            f"{list(r.shape)}; move channels first with np.moveaxis(img, -1, 0), or turn "
            "SSIM off (compute_ssim=False)"
        )
    smap = _ssim_map(r, q)
    if w is None:
        return float(smap.mean())
    p = SSIM_WINDOW // 2
    wc = w[..., p:-p, p:-p]
    wsum = float(wc.sum())
    if wsum == 0.0:
        raise AvatarqError(
            f"mask selects only pixels within {p} px of the border, where SSIM is undefined"
        )
    return float(np.vdot(smap.ravel(), np.ascontiguousarray(wc).ravel()) / wsum)


def ssim(ref: Any, test: Any, mask: Any = None) -> float:
    """Structural similarity, Gaussian window 11 (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2.

    Computed per channel on the 'valid' region (windows fully inside the image, as in
    the reference MATLAB implementation), then averaged over channels and pixels.

    Args:
        ref, test: float arrays [C, H, W] (channel-first) or [H, W], H, W >= 11, values
            in [0, 1] (peak 1).
        mask: optional weights broadcastable to `ref`; the SSIM map (window centres) is
            averaged with the mask cropped to the valid region.

    Returns:
        float in [-1, 1]; exactly 1.0 for identical images.
    """
    r, q = _as_float64(ref, "ref"), _as_float64(test, "test")
    _check_same_shape(r, q)
    return _ssim64(r, q, None if mask is None else _weights(mask, r.shape))


# --------------------------------------------------------------------------- tolerances


def _check_tol(name: str, value: float | None, lo: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AvatarqError(f"tolerance {name} must be a finite number or None, got {value!r}")
    if lo is not None and value < lo:
        raise AvatarqError(f"tolerance {name} must be >= {lo}, got {value}")


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail thresholds of a `SequenceComparison`; None = not checked.

    Attributes:
        min_psnr: lowest allowed mean PSNR over frames, dB.
        min_psnr_frame: lowest allowed PSNR of any single frame, dB.
        min_ssim: lowest allowed mean SSIM (needs SSIM computed).
        max_jitter_ratio: highest allowed jitter ratio J (in [0, 2]).
        max_tde: highest allowed temporal difference error (mean |e_t - e_{t-1}|).
        max_flicker_excess: highest allowed flicker excess FE.
        max_abs_error: highest allowed |Q - F| anywhere (on the mask).
    """

    min_psnr: float | None = None
    min_psnr_frame: float | None = None
    min_ssim: float | None = None
    max_jitter_ratio: float | None = None
    max_tde: float | None = None
    max_flicker_excess: float | None = None
    max_abs_error: float | None = None
    version: int = TOLERANCES_VERSION

    def __post_init__(self) -> None:
        if self.version != TOLERANCES_VERSION:
            raise AvatarqError(
                f"tolerances version {self.version!r} is not supported (expected "
                f"{TOLERANCES_VERSION}); upgrade avatarq or rewrite the tolerances"
            )
        for name in ("min_psnr", "min_psnr_frame", "min_ssim", "max_flicker_excess"):
            _check_tol(name, getattr(self, name))
        for name in ("max_jitter_ratio", "max_tde", "max_abs_error"):
            _check_tol(name, getattr(self, name), lo=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tolerances:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AvatarqError(f"unknown tolerance field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------- comparison


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


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
        ssim_mean: mean SSIM over frames, or None.
        tde: mean of `tde_per_frame`.
        tde_rms: sqrt(mean over pairs of mean (e_{t+1} - e_t)^2).
        jitter_ratio: J in [0, 2]; 0 when the error is identically 0.
        flicker_excess: mean of `flicker_excess_per_frame` (FE).
        max_abs_error: max |e_t| over all frames (and the mask).
        mean_abs_error: mean of `mean_abs_error_per_frame`.
        masked: whether a mask restricted the means.
        tolerances: the thresholds `bool()` checks.
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
            f"FE {self.flicker_excess:.3g} max|e| {self.max_abs_error:.3g} {verdict}"
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
                out[f.name] = None if v is None else [_json_float(x) for x in v]
            elif isinstance(v, bool | int) or v is None:
                out[f.name] = v
            else:
                out[f.name] = _json_float(v)
        out["passed"] = bool(self)
        out["failures"] = self.failures()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequenceComparison:
        """Inverse of `to_dict` (the derived "passed" and "failures" are ignored)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                raise AvatarqError(f"comparison dict lacks field {f.name!r}")
            v = d[f.name]
            if f.name == "tolerances":
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
        self._j_num = 0.0
        self._j_den = 0.0
        self._max_abs = 0.0
        self._masked = mask is not None

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
        self._psnr.append(_psnr_from_mse(_sqnorm(e, w) / wsum))
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


# --------------------------------------------------------------------------- gates

#: Canonical gate metric -> what it tests. Latency names match `LatencyStats.gate_values`.
GATE_METRICS: dict[str, str] = {
    "psnr": "mean PSNR over frames, dB",
    "psnr_min": "lowest per-frame PSNR, dB",
    "ssim": "mean SSIM over frames",
    "jitter_ratio": "jitter ratio J in [0, 2] (alias J)",
    "tde": "temporal difference error, mean |e_t - e_{t-1}|",
    "fe": "flicker excess FE (alias flicker_excess)",
    "p50_ms": "median latency, ms",
    "p90_ms": "90th percentile latency, ms",
    "p99_ms": "99th percentile latency, ms",
    "mean_ms": "mean latency, ms",
    "fps": "frames per second (alias frames_per_second)",
}
_ALIASES = {"j": "jitter_ratio", "flicker_excess": "fe", "frames_per_second": "fps"}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([^<>=!\s]\S*)\s*$")
_KNOWN_TEXT = (
    "psnr, psnr_min, ssim, J (jitter_ratio), tde, fe, p50_ms, p90_ms, p99_ms, mean_ms, fps"
)


def canonical_metric(name: str) -> str | None:
    """Canonical gate metric for `name` (case-insensitive, aliases resolved), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in GATE_METRICS else None


@dataclass(frozen=True)
class Gate:
    """One release gate: `metric op threshold`, e.g. Gate("psnr", ">=", 40.0)."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        metric = canonical_metric(self.metric)
        if metric is None:
            raise AvatarqError(f"unknown gate metric {self.metric!r}; known: {_KNOWN_TEXT}")
        if self.op not in _OPS:
            raise AvatarqError(f"unknown gate operator {self.op!r}; use one of >=, <=, >, <")
        if not math.isfinite(self.threshold):
            raise AvatarqError(f"gate threshold must be finite, got {self.threshold!r}")
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "threshold", float(self.threshold))

    def check(self, value: float) -> bool:
        """Whether `value` passes; NaN never passes."""
        return bool(_OPS[self.op](float(value), self.threshold))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class GateResult:
    """A gate, the value it saw, and whether it passed; truthy when it passed."""

    gate: Gate
    value: float
    passed: bool

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{self.gate}: {self.value:.6g} {'PASS' if self.passed else 'FAIL'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": str(self.gate),
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": _json_float(self.value),
            "passed": self.passed,
        }


def parse_gates(text: str) -> list[Gate]:
    """Parse comma-separated gates, e.g. "psnr>=40,J<=0.5,p99_ms<=20,tde<=0.01".

    Each part is METRIC OP NUMBER with OP one of >=, <=, >, < and METRIC from
    `GATE_METRICS` (case-insensitive; J = jitter_ratio). Raises AvatarqError naming the
    bad part on anything else.
    """
    parts = text.split(",")
    if not text.strip():
        raise AvatarqError(f"no gate given; write e.g. psnr>=40,J<=0.5 (metrics: {_KNOWN_TEXT})")
    gates = []
    for part in parts:
        m = _GATE_RE.match(part)
        if m is None:
            raise AvatarqError(
                f"malformed gate {part.strip()!r} in {text!r}: expected METRIC OP NUMBER "
                f"with OP one of >=, <=, >, < (e.g. psnr>=40); metrics: {_KNOWN_TEXT}"
            )
        name, op, number = m.groups()
        if canonical_metric(name) is None:
            raise AvatarqError(
                f"unknown gate metric {name!r} in {part.strip()!r}; known: {_KNOWN_TEXT}"
            )
        try:
            threshold = float(number)
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise AvatarqError(
                f"gate {part.strip()!r}: threshold {number!r} is not a finite number"
            )
        gates.append(Gate(name, op, threshold))
    return gates


def evaluate_gates(gates: Iterable[Gate], values: Mapping[str, float]) -> list[GateResult]:
    """Check each gate against `values` (keys: gate metric names or aliases).

    Extra values are ignored; a gate whose metric is missing raises AvatarqError (the
    run did not measure it), listing what was measured.
    """
    canon = {}
    for key, value in values.items():
        c = canonical_metric(key)
        if c is not None:
            canon[c] = value
    results = []
    for gate in gates:
        if gate.metric not in canon:
            raise AvatarqError(
                f"gate {gate} needs metric {gate.metric!r}, which this run did not measure "
                f"(measured: {', '.join(sorted(canon)) or 'nothing'})"
            )
        value = float(canon[gate.metric])
        results.append(GateResult(gate, value, gate.check(value)))
    return results
