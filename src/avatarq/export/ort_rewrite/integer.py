"""Integer kernels for quantized layers: channels-last im2col + MatMulIntegerToFloat.

ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat`` multiplies uint8 activations (with
their zero point) by int8 weights with an int32 accumulator (VNNI on AVX-512/AVX2 CPUs)
and writes ``fl(fl(acc * fl(a_scale * b_scale[n])) + bias[n])``: the exact form's rescale
and bias (`exact.exact_layer`), bit for bit (checked in the tests). Convolutions become
that GEMM on an im2col of the channels-last 8-bit input (Pad with the zero point, one
Slice per kernel tap, Concat), so the column buffer is 8-bit too.

- ConvTranspose(k4, s2, p1): the merged 2x2 phase conv (`phases.phase_gemm_weights`);
  its output is the layer in the ``phases`` layout.
- Conv (group 1, no dilation, any kernel, stride and pads): a k x k im2col, output NHWC.
- Gemm / MatMul: the GEMM itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from avatarq.export.ort_rewrite.graph import MS_DOMAIN, Builder, attr
from avatarq.export.ort_rewrite.layers import QuantLayer
from avatarq.export.ort_rewrite.layout import NHWC, PhaseGrid
from avatarq.export.ort_rewrite.phases import col2im_order, gemm_weights, phase_gemm_weights

GEMM_OP = "MatMulIntegerToFloat"


def gemm(
    b: Builder,
    layer: QuantLayer,
    a: ir.Value,
    matrix: np.ndarray,
    column_channel: np.ndarray,
    base: str,
    column_gain: np.ndarray | None = None,
) -> ir.Value:
    """``MatMulIntegerToFloat(a, matrix)`` rescaled like ``layer``.

    Args:
        a: uint8/int8 [..., K] activations with the layer's zero point.
        matrix: int8 [K, M] weights.
        column_channel: int [M], the output channel of each column (its scale and bias).
        column_gain: float [M] extra factors folded into the weight scales (float-output
            layers only: not bit-exact then, and not meant to be).
    """
    w_scale = layer.w_scale[column_channel]
    if column_gain is not None:
        w_scale = (w_scale.astype(np.float64) * column_gain).astype(np.float32)
    inputs = [
        a,
        b.const(f"{base}.weight_int8", np.ascontiguousarray(matrix.astype(np.int8))),
        b.const(f"{base}.input_scale", np.float32(layer.x_scale)),
        b.const(f"{base}.weight_scale", np.ascontiguousarray(w_scale)),
        b.const(f"{base}.input_zero_point", layer.x_zero_point),
    ]
    bias = None
    if layer.bias is not None:
        bias = np.broadcast_to(layer.bias.reshape(-1), (layer.cout,))[column_channel]
        if column_gain is not None:
            bias = bias.astype(np.float64) * column_gain
    if bias is not None and np.any(bias != 0):
        inputs += [None, b.const(f"{base}.bias", bias.astype(np.float32))]
    return b.op(GEMM_OP, inputs, base, domain=MS_DOMAIN)


def im2col(
    b: Builder,
    x: ir.Value,
    zero_point: np.ndarray,
    hw: tuple[int, int],
    kernel: tuple[int, int],
    pads: tuple[int, int, int, int],
    strides: tuple[int, int],
    base: str,
) -> tuple[ir.Value, tuple[int, int]]:
    """Channels-last 8-bit im2col of x [N, H, W, C]: [N, Ho, Wo, kh * kw * C] with column
    (di * kw + dj) * C + c = input channel c at window offset (di, dj); padding holds the
    zero point (the value 0 dequantizes to). Returns (columns, (Ho, Wo))."""
    (h, w), (kh, kw), (top, left, bottom, right), (sh, sw) = hw, kernel, pads, strides
    ho, wo = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    if any(pads):
        amounts = b.const(f"{base}.pads", np.array([0, top, left, 0, 0, bottom, right, 0]))
        x = b.op("Pad", [x, amounts, b.const(f"{base}.pad_value", zero_point)], f"{base}.padded")
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x, (ho, wo)
    axes = b.const(f"{base}.tap_axes", np.array([1, 2]))
    steps = b.const(f"{base}.tap_steps", np.array([sh, sw]))
    taps = []
    for di in range(kh):
        for dj in range(kw):
            starts = b.const(f"{base}.tap_starts", np.array([di, dj]))
            ends = b.const(
                f"{base}.tap_ends", np.array([di + sh * (ho - 1) + 1, dj + sw * (wo - 1) + 1])
            )
            taps.append(b.op("Slice", [x, starts, ends, axes, steps], f"{base}.tap"))
    return b.op("Concat", taps, f"{base}.columns", axis=3), (ho, wo)


def conv_transpose(
    b: Builder, layer: QuantLayer, x_nhwc: ir.Value, hw: tuple[int, int]
) -> tuple[ir.Value, PhaseGrid]:
    """A ConvTranspose(k4, s2, p1) layer on x [N, H, W, Cin] (uint8): its output in the
    ``phases`` layout [N, H + 1, W + 1, 4 Cout] and the grid that describes it."""
    base = layer.name
    cols, _ = im2col(b, x_nhwc, layer.x_zero_point, hw, (2, 2), (1, 1, 1, 1), (1, 1), base)
    channel = np.tile(np.arange(layer.cout), 4)
    out = gemm(b, layer, cols, phase_gemm_weights(layer.weight), channel, f"{base}.phases")
    return out, PhaseGrid(layer.cout, hw[0], hw[1])


def conv_transpose_to_image(
    b: Builder,
    layer: QuantLayer,
    x_nhwc: ir.Value,
    hw: tuple[int, int],
    gain: np.ndarray,
    offset: np.ndarray | None,
) -> ir.Value:
    """A ConvTranspose(k4, s2, p1) layer whose output is no quantized layer's input (the
    texture layer): integer GEMM with the affine tail's per-channel ``gain`` folded into
    the weight scales, its columns in Col2Im order, Col2Im into [N, Cout, 2H, 2W], then
    one Add of ``offset`` (the tail's additive constants). Float rounding differs from
    the graph's by an ulp here; no quantizer follows, so nothing amplifies it."""
    base = layer.name
    cols, _ = im2col(b, x_nhwc, layer.x_zero_point, hw, (2, 2), (1, 1, 1, 1), (1, 1), base)
    order = col2im_order(layer.cout)
    matrix = phase_gemm_weights(layer.weight)[:, order]
    channel = order % layer.cout
    y = gemm(b, layer, cols, matrix, channel, f"{base}.phases", column_gain=gain[channel])
    (h, w), c = hw, layer.cout
    flat = b.op("Reshape", [y, b.const(f"{base}.blocks_shape", np.array([0, -1, 4 * c]))], base)
    columns = b.op("Transpose", [flat], f"{base}.columns", perm=[0, 2, 1])
    image = b.const(f"{base}.image_shape", np.array([2 * h, 2 * w]))
    block = b.const(f"{base}.block_shape", np.array([2, 2]))
    out = b.op("Col2Im", [columns, image, block], base, pads=[1, 1, 1, 1], strides=[2, 2])
    if offset is not None and np.any(offset != 0):
        out = b.op("Add", [out, b.const(f"{base}.tail_offset", offset)], f"{base}.offset")
    return out


def conv(
    b: Builder, layer: QuantLayer, x_nhwc: ir.Value, hw: tuple[int, int]
) -> tuple[ir.Value, tuple[int, int, int]]:
    """A Conv layer on x [N, H, W, Cin] (uint8): output [N, Ho, Wo, Cout] and (C, Ho, Wo)."""
    node = layer.node
    kh, kw = layer.weight.shape[2:]
    pads = tuple(attr(node, "pads", (0, 0, 0, 0)))
    pads = (pads[0], pads[1], pads[2], pads[3])
    strides = tuple(attr(node, "strides", (1, 1)))
    cols, (ho, wo) = im2col(
        b, x_nhwc, layer.x_zero_point, hw, (kh, kw), pads, (strides[0], strides[1]), layer.name
    )
    matrix = gemm_weights(layer.weight)
    out = gemm(b, layer, cols, matrix, np.arange(layer.cout), f"{layer.name}.gemm")
    return out, (layer.cout, ho, wo)


def matmul(b: Builder, layer: QuantLayer) -> ir.Value:
    """A Gemm/MatMul layer on its 8-bit input as it is; output like the node's."""
    return gemm(b, layer, layer.q, layer.matrix(), np.arange(layer.cout), f"{layer.name}.gemm")


__all__ = ["GEMM_OP", "NHWC", "conv", "conv_transpose", "conv_transpose_to_image", "matmul"]
