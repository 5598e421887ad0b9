"""Layer formats (wXaY, fp8, fp16, fp32), the FP8 grid, and weight scale layouts."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from avatarq.calibration import CalibrationConfig
from avatarq.calibration.config import parse_precision
from avatarq.calibration.formats import canonical_bits, parse_format
from avatarq.calibration.quantizers import (
    FloatGrid,
    WeightLayout,
    activation_range,
    fake_quantize,
    mse_weight_scales,
    symmetric_scale,
    weight_codes,
    weight_range,
    weight_scales,
)
from avatarq.errors import AvatarqError


@pytest.mark.parametrize(
    "text, weight_bits, act_bits, container",
    [
        ("w8a8", 8, 8, "int8"),
        ("W6A6", 6, 6, "int8"),
        ("w4a8", 4, 8, "int4"),
        ("w4a4", 4, 4, "int4"),
        ("w3a8", 3, 8, "int4"),
    ],
)
def test_integer_formats_name_weight_and_activation_bits_and_the_container(
    text, weight_bits, act_bits, container
):
    fmt = parse_format(text)
    assert (fmt.kind, fmt.weight_bits, fmt.act_bits) == ("int", weight_bits, act_bits)
    assert fmt.weight_container == container and fmt.quantized


def test_an_integer_bit_width_means_the_same_width_for_weights_and_activations():
    assert parse_format(6).name == "w6a6"
    assert canonical_bits(8) == "w8a8"
    assert CalibrationConfig(bits=6).bits == "w6a6"


def test_fp8_and_float_formats():
    assert parse_format("fp8").weight_container == "float8e4m3fn"
    assert parse_format("fp16").weight_container == "float16" and not parse_format("fp16").quantized
    assert parse_format("fp32").weight_bits_stored == 32


@pytest.mark.parametrize("bad", ["w9a8", "w4", "int4", "fp4", "w1a8", "8bit", ""])
def test_bad_bits_are_one_line_errors_naming_the_argument(bad):
    with pytest.raises(AvatarqError, match="--bits") as info:
        parse_format(bad)
    assert "\n" not in str(info.value)


def test_int8_in_overrides_means_the_calibrations_format():
    assert parse_precision("dec.z_fc=int8", bits="w4a8") == {"dec.z_fc": "w4a8"}
    assert CalibrationConfig(bits="w6a6", precision={"dec.z_fc": "int8"}).precision == {
        "dec.z_fc": "w6a6"
    }


def test_a_version_1_config_with_an_integer_bits_loads_as_wNaN():
    old = CalibrationConfig().to_dict()
    old.update(version=1, bits=6)
    assert CalibrationConfig.from_dict(old).bits == "w6a6"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": "fp8", "symmetric": False}, "symmetric only"),
        ({"bits": "fp8", "gptq": True}, "gptq"),
        ({"adaround": True, "gptq": True}, "pick one"),
        ({"weight_block": 1}, "weight_block"),
        ({"smooth_alpha": 1.5}, "smooth_alpha"),
        ({"bias_format": "int2"}, "texel bias format"),
        ({"size_budget": "lots"}, "--size-budget"),
        ({"weight_search": "l1"}, "weight_search"),
    ],
)
def test_config_rejects_bad_method_combinations(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        CalibrationConfig(**kwargs)


# ------------------------------------------------------------------ FP8
def test_fp8_fake_quantization_rounds_like_float8e4m3fn_and_saturates_at_448():
    x = torch.tensor([0.0, 1.0625, 1.1875, 3.3, -300.5, 447.0, 1000.0, -1e9, 2.0**-9])
    q = fake_quantize(x, torch.tensor(1.0), 0.0, FloatGrid())
    expected = np.clip(x.numpy(), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(q.numpy(), expected)
    assert float(q.max()) == 448.0 and float(q.min()) == -448.0


def test_fp8_scales_map_amax_to_448():
    assert float(symmetric_scale(896.0, "fp8")) == 2.0
    assert isinstance(activation_range("fp8"), FloatGrid)
    with pytest.raises(AvatarqError, match="symmetric"):
        activation_range("fp8", symmetric=False)


def test_fp8_weight_codes_are_exact_float8_values():
    w = torch.randn(4, 6)
    s = weight_scales(w, 0, "fp8")
    codes = weight_codes(w, s, 0, "fp8")
    assert np.array_equal(codes, codes.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.abs(codes).max() == 448.0


# ------------------------------------------------------------------ layouts
def test_block_scales_have_onnx_blocked_shape_along_the_input_axis():
    conv_t = WeightLayout.for_weight(axis=1, ndim=4, block=4)  # ConvTranspose [Cin, Cout, k, k]
    assert conv_t.in_axis == 0
    assert conv_t.scale_shape((10, 3, 4, 4)) == (3, 3, 4, 4)  # ceil(10 / 4) blocks
    linear = WeightLayout.for_weight(axis=0, ndim=2, block=32)
    assert linear.scale_shape((7, 64)) == (7, 2)
    assert WeightLayout(0, 1).scale_shape((7, 64)) == (7,)


def test_block_amax_and_expand_agree_elementwise():
    torch.manual_seed(0)
    w = torch.randn(10, 3, 2, 2)
    layout = WeightLayout(1, 0, 4)
    amax = layout.amax(w)
    full = layout.expand(amax, tuple(w.shape))
    assert full.shape == w.shape
    assert bool((w.abs() <= full).all())
    assert torch.equal(full[4:8].amax(dim=0), w[4:8].abs().amax(dim=0))


def test_mse_weight_scales_never_round_worse_than_max_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.rand(16, 1) ** 3
    layout = WeightLayout(0, 1)
    grid = weight_range(4)
    max_err = (fake_quantize(w, weight_scales(w, 0, 4)[:, None], 0.0, grid) - w).pow(2).sum(1)
    mse_err = (
        (fake_quantize(w, mse_weight_scales(w, layout, 4)[:, None], 0.0, grid) - w).pow(2).sum(1)
    )
    assert bool((mse_err <= max_err + 1e-7).all())
    assert float(mse_err.sum()) < 0.95 * float(max_err.sum())
