"""Per-image fidelity metrics (PSNR, SSIM) and the frame conventions every metric shares.

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
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from avatarq.errors import AvatarqError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


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


def psnr_from_mse(mse: float) -> float:
    """10 log10(1 / mse) dB (peak 1); inf for mse 0. The one PSNR formula of avatarq."""
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
    return psnr_from_mse(_sqnorm(e, w) / (e.size if w is None else float(w.sum())))


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
