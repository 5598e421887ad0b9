"""ConvTranspose(k4, s2, p1) as stride-1 convolutions: the weight and constant layouts.

Output phase (a, b) of ConvTranspose(kernel 4, stride 2, pad 1), i.e. the output texels
(2m + a, 2k + b), is a 2x2 stride-1 convolution of the input with the taps
``w[:, :, TAPS[a], TAPS[b]]`` and pads (top, left, bottom, right) = (1 - a, 1 - b, a, b).
All four phases are ONE 2x2 convolution with pads 1 and 4 x Cout outputs
(`merged_phase_weights`): its [H + 1, W + 1] output, read channels-last as blocks of
2 x 2 texels, is the layer output with one extra texel on every side.

Everything here re-arranges values and never changes them, so int8 weights stay int8.
"""

from __future__ import annotations

import numpy as np

from avatarq.errors import AvatarqError

# Kernel taps of output phase 0 and 1 along one axis, for input rows (m - 1 + p, m + p).
TAPS = ((3, 1), (2, 0))
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def phase_pads(a: int, b: int) -> tuple[int, int, int, int]:
    """Conv pads (top, left, bottom, right) of output phase (a, b)."""
    return (1 - a, 1 - b, a, b)


def phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> the four stride-1 phase conv weights.

    Args:
        weight: [Cin, Cout, 4, 4] (ONNX/torch ConvTranspose layout), any dtype.

    Returns:
        [4, Cout, Cin, 2, 2] of the same dtype; entry ``2 * a + b`` is output phase (a, b):
        a Conv with it, stride 1 and pads `phase_pads(a, b)` gives the output texels
        (2m + a, 2k + b) of the ConvTranspose.
    """
    if weight.ndim != 4 or weight.shape[2:] != (4, 4):
        raise AvatarqError(
            f"phase_weights needs a [Cin, Cout, 4, 4] weight, got {list(weight.shape)}"
        )
    w = np.swapaxes(weight, 0, 1)  # [Cout, Cin, 4, 4]
    phases = [w[:, :, list(TAPS[a]), :][:, :, :, list(TAPS[b])] for a, b in PHASES]
    return np.ascontiguousarray(np.stack(phases))


def merged_phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> ONE 2x2 conv (pads 1) that computes every phase.

    Args:
        weight: [Cin, Cout, 4, 4] ConvTranspose weights, any dtype.

    Returns:
        [4 * Cout, Cin, 2, 2], phase-major: output channel ``(2u + v) * Cout + c`` at window
        (i, j) of the conv's [H + 1, W + 1] output is channel c of output texel
        (2i - 1 + u, 2j - 1 + v). Channels-last, the output [H + 1, W + 1, 2, 2, Cout] read
        as [H + 1, 2, W + 1, 2, Cout] is the ConvTranspose output with one extra texel on
        every side.
    """
    phases = phase_weights(weight)  # [4, Cout, Cin, 2, 2], index 2a + b = 3 - (2u + v)
    return np.ascontiguousarray(np.concatenate([phases[3 - k] for k in range(4)]))


def col2im_order(cout: int) -> np.ndarray:
    """Column permutation from `merged_phase_weights` order ((2u + v) * Cout + c) to
    Col2Im order (4c + 2u + v): ``merged[..., col2im_order(C)]`` is Col2Im's input."""
    return np.array([(2 * u + v) * cout + c for c in range(cout) for u in (0, 1) for v in (0, 1)])


def col2im_phase_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights -> ONE 2x2 conv whose output Col2Im interleaves.

    Returns:
        [4 * Cout, Cin, 2, 2]: output channel ``4c + 2u + v`` is channel c of texel
        (2i - 1 + u, 2j - 1 + v). A Conv with pads 1 gives [N, 4 Cout, H + 1, W + 1]; as
        Col2Im columns (block 2x2, stride 2, pads 1, image 2H x 2W) it lands every phase on
        its texels (no two blocks overlap): the ConvTranspose output.
    """
    merged = merged_phase_weights(weight)
    return np.ascontiguousarray(merged[col2im_order(weight.shape[1])])


def gemm_weights(conv_weight: np.ndarray) -> np.ndarray:
    """A stride-1 conv weight [Cout, Cin, kh, kw] -> the [kh * kw * Cin, Cout] matrix that
    multiplies a channels-last im2col whose column ``(di * kw + dj) * Cin + ci`` holds input
    channel ci at window offset (di, dj)."""
    cout, cin, kh, kw = conv_weight.shape
    return np.ascontiguousarray(conv_weight.transpose(2, 3, 1, 0).reshape(kh * kw * cin, cout))


def phase_gemm_weights(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose(k4, s2, p1) weights [Cin, Cout, 4, 4] -> [4 Cin, 4 Cout]: the merged
    phase conv as a GEMM on the channels-last 2x2 im2col of the input padded by 1."""
    return gemm_weights(merged_phase_weights(weight))


def as_4d(value: np.ndarray) -> np.ndarray:
    """A constant of rank <= 4 with ONNX broadcasting, as rank 4."""
    return value.reshape((1,) * (4 - value.ndim) + value.shape)


def broadcastable(value: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """Whether a constant broadcasts against [N, C, H, W] (``shape`` = (C, H, W)) without
    changing the result's shape."""
    if value.ndim > 4:
        return False
    v = as_4d(value)
    return v.shape[0] == 1 and all(d in (1, s) for d, s in zip(v.shape[1:], shape, strict=True))


def nhwc_constant(value: np.ndarray) -> np.ndarray:
    """A constant broadcasting against [N, C, H, W], laid out for [N, H, W, C]."""
    if value.ndim == 0 or value.size == 1:
        return value
    return np.ascontiguousarray(as_4d(value).transpose(0, 2, 3, 1))


def phases_constant(value: np.ndarray, cout: int, hw: tuple[int, int]) -> np.ndarray:
    """A constant broadcasting against a layer output [N, C, 2H, 2W], laid out like the
    merged phase conv's channels-last output [N, H + 1, W + 1, 4C] (channel (2u + v) C + c).

    Texels outside the image (the extra border the interleave crops) repeat the edge.
    """
    if value.ndim == 0 or value.size == 1:
        return value
    v = as_4d(value)
    h, w = hw
    if v.shape[2:] == (1, 1):
        per_channel = np.broadcast_to(v.reshape(-1), (cout,))
        return np.ascontiguousarray(np.tile(per_channel, 4).reshape(1, 1, 1, 4 * cout))
    full = np.broadcast_to(v, (1, cout, 2 * h, 2 * w))[0]
    padded = np.pad(full, ((0, 0), (1, 1), (1, 1)), mode="edge")
    blocks = padded.reshape(cout, h + 1, 2, w + 1, 2)  # c, i, u, j, v
    merged = blocks.transpose(1, 3, 2, 4, 0).reshape(1, h + 1, w + 1, 4 * cout)
    return np.ascontiguousarray(merged)
