"""Storage formats of the untied texel biases (most of a DAM decoder's parameters).

Each upsampling layer of a DAM adds a bias of its own output size, [1, C, H, W] (the conv
bias folded in, see `avatarq.models.deploy.fold_weight_norm`). They are not layer weights:
no quantizer sits on them in the graph, so by default they stay float32. To make a bundle
small they can be stored as

- ``fp16``: a float16 initializer and a Cast to float32 (relative error <= 2^-11);
- ``int8``: int8 codes with one scale per channel (amax / 127) behind a DequantizeLinear
  (axis 1); a static error (it does not change from frame to frame) of up to half a step.

`quantize_bias` is the one definition both the fake-quant model and the ONNX export use.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from avatarq.calibration.quantizers import MIN_SCALE
from avatarq.errors import AvatarqError

BIAS_FORMATS = ("fp32", "fp16", "int8")
INT8_BIAS_QMAX = 127


def check_bias_format(value: str) -> str:
    if value not in BIAS_FORMATS:
        raise AvatarqError(
            f"texel bias format must be one of {', '.join(BIAS_FORMATS)}, got {value!r}"
        )
    return value


def texel_bias_names(decoder: nn.Module) -> list[str]:
    """Parameter names of the untied biases ([1, C, H, W]) of ``decoder``'s upsampling
    layers (`DeconvTexelBias.bias`), in module order."""
    from avatarq.models.layers import DeconvTexelBias

    return [
        f"{name}.bias"
        for name, module in decoder.named_modules()
        if isinstance(module, DeconvTexelBias)
    ]


def bias_scale(values: np.ndarray) -> np.ndarray:
    """Per-channel int8 scale amax / 127 of a [1, C, H, W] bias: float32 [C]."""
    amax = np.abs(values).max(axis=(0, 2, 3)).astype(np.float32)
    return np.maximum(amax / np.float32(INT8_BIAS_QMAX), np.float32(MIN_SCALE)).astype(np.float32)


def quantize_bias(
    values: np.ndarray, fmt: str, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(stored array, per-channel scale or None, float32 values the graph computes with).

    Args:
        values: float32 [1, C, H, W] bias.
        fmt: "fp32", "fp16" or "int8".
        scale: int8 scales float32 [C] (None: `bias_scale`).
    """
    check_bias_format(fmt)
    values = np.asarray(values, np.float32)
    if values.ndim != 4 or values.shape[0] != 1:
        raise AvatarqError(f"a texel bias is [1, C, H, W], got {list(values.shape)}")
    if fmt == "fp32":
        return values, None, values
    if fmt == "fp16":
        stored = values.astype(np.float16)
        return stored, None, stored.astype(np.float32)
    scale = bias_scale(values) if scale is None else np.asarray(scale, np.float32)
    s = scale.reshape(1, -1, 1, 1)
    q = np.clip(np.rint(values / s), -INT8_BIAS_QMAX, INT8_BIAS_QMAX).astype(np.int8)
    return q, scale, (q.astype(np.float32) * s).astype(np.float32)
