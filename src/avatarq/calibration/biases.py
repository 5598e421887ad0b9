"""Storage formats of the untied texel biases and the output offset of a DAM decoder.

Each upsampling layer of a DAM adds a bias of its own output size, [1, C, H, W] (the conv
bias folded in, see `avatarq.models.deploy.fold_weight_norm`), and the deployable decoder
ends with a per-texel offset, ``tex_offset`` [1, 3, T, T] (the mean texture with the
colour correction folded in). Together they are most of a full-size DAM's parameters. No
quantizer sits on them in the graph, so by default they stay float32. To make a bundle
small, ``--bias-format`` stores them as

=========  =========================================  ====================================
format     texel biases                               output offset
=========  =========================================  ====================================
``fp32``   float32                                    float32
``fp16``   float16 + Cast                             float16 + Cast
``int8``   int8 codes, one scale per channel          float16 + Cast
           (amax / 127), DequantizeLinear axis 1
``int4``   packed INT4 codes, one scale (amax / 7)    uint8 codes in blocks of up to 64
           per block of up to 64 texels of a row,     texels along a row, a float32 scale
           blocked DequantizeLinear (axis 3)          and base per block
=========  =========================================  ====================================

Every error here is static (it does not change from frame to frame): half a step at most.
The offset is positive and smooth (a mean texture), so it is coded against its own
per-block minimum ("uint8-blocks") rather than symmetrically about zero.

`quantize_bias` / `quantize_offset` are the one definition both the fake-quant model and
the ONNX export use; `stored_bytes` is the size the graph holds.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from avatarq.calibration.quantizers import MIN_SCALE
from avatarq.errors import AvatarqError

BIAS_FORMATS = ("fp32", "fp16", "int8", "int4")
OFFSET_FORMATS = ("fp32", "fp16", "uint8-blocks")
OFFSET_FORMAT_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16", "int4": "uint8-blocks"}
BIAS_QMAX = {"int8": 127, "int4": 7}
ROW_BLOCK = 64
OFFSET_LEVELS = 255
OFFSET_NAMES = ("tex_offset",)


def check_bias_format(value: str) -> str:
    if value not in BIAS_FORMATS:
        raise AvatarqError(
            f"texel bias format must be one of {', '.join(BIAS_FORMATS)}, got {value!r}"
        )
    return value


def check_stored_format(name: str, value: str) -> str:
    """A texel bias's or the output offset's format, as the calibration document states it."""
    allowed = OFFSET_FORMATS if name in OFFSET_NAMES else BIAS_FORMATS
    if value not in allowed:
        raise AvatarqError(f"{name} cannot be stored as {value!r} (one of {', '.join(allowed)})")
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


def offset_names(decoder: nn.Module) -> list[str]:
    """Buffer names of ``decoder``'s per-texel output offsets ([1, C, H, W], H * W > 1)."""
    buffers = dict(decoder.named_buffers())
    return [
        name
        for name in OFFSET_NAMES
        if name in buffers and buffers[name].dim() == 4 and buffers[name].shape[-1] > 1
    ]


def stored_formats(decoder: nn.Module, bias_format: str) -> dict[str, str]:
    """{tensor: format} of every texel bias and output offset under ``bias_format``."""
    check_bias_format(bias_format)
    formats = {name: bias_format for name in texel_bias_names(decoder)}
    formats.update({name: OFFSET_FORMAT_OF[bias_format] for name in offset_names(decoder)})
    return formats


def bias_scale(values: np.ndarray, fmt: str = "int8") -> np.ndarray:
    """Scales amax / qmax of a [1, C, H, W] bias: int8 float32 [C] (one per channel); int4
    float32 [C, H, W / B] (one per block of B = `row_block` (W) texels of a row)."""
    qmax = np.float32(BIAS_QMAX[fmt])
    if fmt == "int4":
        amax = np.abs(_blocks(values, row_block(values.shape[-1]))).max(axis=-1)[0]
    else:
        amax = np.abs(values).max(axis=(0, 2, 3))
    return np.maximum(amax.astype(np.float32) / qmax, np.float32(MIN_SCALE)).astype(np.float32)


def _blocks(values: np.ndarray, block: int) -> np.ndarray:
    """[1, C, H, W] -> [1, C, H, W / block, block]."""
    _, c, h, w = values.shape
    return values.reshape(1, c, h, w // block, block)


def _check_4d(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if values.ndim != 4 or values.shape[0] != 1:
        raise AvatarqError(f"{what} is [1, C, H, W], got {list(values.shape)}")
    return values


def quantize_bias(
    values: np.ndarray, fmt: str, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(stored array, scales or None, float32 values the graph computes with).

    Args:
        values: float32 [1, C, H, W] bias.
        fmt: "fp32", "fp16", "int8" or "int4" (int4 codes come back as int8 in -7..7;
            the export packs them).
        scale: the `bias_scale` of ``values`` (None: computed here).
    """
    check_bias_format(fmt)
    values = _check_4d(values, "a texel bias")
    if fmt == "fp32":
        return values, None, values
    if fmt == "fp16":
        stored = values.astype(np.float16)
        return stored, None, stored.astype(np.float32)
    qmax = BIAS_QMAX[fmt]
    expected = bias_scale(values, fmt)
    scale = expected if scale is None else np.asarray(scale, np.float32)
    if scale.shape != expected.shape:
        raise AvatarqError(
            f"a {fmt} texel bias of shape {list(values.shape)} needs scales "
            f"{list(expected.shape)}, got {list(scale.shape)}"
        )
    if fmt == "int4":
        grouped = _blocks(values, row_block(values.shape[-1]))
        s = scale[None, ..., None]
    else:
        grouped, s = values, scale.reshape(1, -1, 1, 1)
    q = np.clip(np.rint(grouped / s), -qmax, qmax).astype(np.int8)
    rounded = (q.astype(np.float32) * s).astype(np.float32)
    return q.reshape(values.shape), scale, rounded.reshape(values.shape)


def row_block(width: int) -> int:
    """Texels per block of a texel-bias or offset row (one int4 scale, or one uint8 scale
    and base): the largest of `ROW_BLOCK`, ROW_BLOCK / 2, ..., 1 that divides ``width``."""
    block = ROW_BLOCK
    while width % block:
        block //= 2
    return block


def quantize_offset(values: np.ndarray, fmt: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({part: stored array}, float32 values the graph computes with) of an output offset.

    ``fp16``: {"fp16": float16 [1, C, H, W]}. ``uint8-blocks``: each row is cut into blocks
    of `row_block` texels; a block stores uint8 codes and float32 ``scale`` (range / 255)
    and ``base`` (its minimum), value = code * scale + base (computed in float32, as the
    graph does): {"codes": uint8 [1, C, H, W / B, B], "scale", "base": float32
    [1, C, H, W / B, 1]}.
    """
    if fmt not in OFFSET_FORMATS:
        raise AvatarqError(f"offset format must be one of {', '.join(OFFSET_FORMATS)}, got {fmt!r}")
    values = _check_4d(values, "an output offset")
    if fmt == "fp32":
        return {"fp32": values}, values
    if fmt == "fp16":
        stored = values.astype(np.float16)
        return {"fp16": stored}, stored.astype(np.float32)
    _, c, h, w = values.shape
    block = row_block(w)
    rows = values.reshape(1, c, h, w // block, block)
    base = rows.min(axis=-1, keepdims=True)
    spread = rows.max(axis=-1, keepdims=True) - base
    scale = np.maximum(spread / np.float32(OFFSET_LEVELS), np.float32(MIN_SCALE))
    scale = scale.astype(np.float32)
    codes = np.clip(np.rint((rows - base) / scale), 0, OFFSET_LEVELS).astype(np.uint8)
    rounded = codes.astype(np.float32) * scale + base
    return {"codes": codes, "scale": scale, "base": base}, rounded.reshape(values.shape)


def stored_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes a [1, C, H, W] texel bias or offset takes in the graph in ``fmt`` (scales
    included)."""
    n = int(np.prod(shape))
    if fmt == "fp32":
        return 4 * n
    if fmt == "fp16":
        return 2 * n
    if fmt == "int8":
        return n + 4 * shape[1]
    if fmt == "int4":
        return (n + 1) // 2 + 4 * (n // row_block(shape[-1]))
    if fmt == "uint8-blocks":
        return n + 8 * (n // row_block(shape[-1]))
    raise AvatarqError(f"unknown storage format {fmt!r}")
