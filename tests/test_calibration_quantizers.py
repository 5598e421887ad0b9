"""Quantizer math: TensorRT's symmetric form, 6-bit ranges, the grid search, AdaRound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarq.calibration.quantizers import (
    GRID_CANDIDATES,
    activation_range,
    adaround_beta,
    adaround_init,
    adaround_integers,
    asymmetric_params,
    dequantize_weight,
    fake_quantize,
    max_activation_range,
    quantize_weight,
    rectified_sigmoid,
    search_activation_range,
    symmetric_scale,
    weight_range,
    weight_scales,
)
from avatarq.errors import AvatarqError


def test_symmetric_scale_is_amax_over_127_at_8_bits():
    assert float(symmetric_scale(2.54, 8)) == pytest.approx(0.02, rel=1e-6)


def test_symmetric_scale_is_amax_over_31_at_6_bits():
    assert float(symmetric_scale(3.1, 6)) == pytest.approx(0.1, rel=1e-6)


def test_integer_ranges_at_8_and_6_bits():
    assert (activation_range(8).qmin, activation_range(8).qmax) == (-128, 127)
    assert (weight_range(8).qmin, weight_range(8).qmax) == (-127, 127)
    assert (activation_range(6).qmin, activation_range(6).qmax) == (-32, 31)
    assert (weight_range(6).qmin, weight_range(6).qmax) == (-31, 31)
    assert (activation_range(8, symmetric=False).qmin, activation_range(8, False).qmax) == (0, 255)


def test_bits_outside_the_int8_container_are_rejected():
    with pytest.raises(AvatarqError, match="bits"):
        activation_range(9)


def test_fake_quantize_saturates_to_the_signed_range():
    s = torch.tensor(0.5)
    x = torch.tensor([1000.0, -1000.0, 0.74, -0.76])
    out = fake_quantize(x, s, 0.0, activation_range(8))
    assert out.tolist() == [127 * 0.5, -128 * 0.5, 0.5, -1.0]


def test_fake_quantize_clips_to_the_6_bit_range_inside_the_int8_container():
    s = torch.tensor(1.0)
    out = fake_quantize(torch.tensor([100.0, -100.0, 20.0]), s, 0.0, activation_range(6))
    assert out.tolist() == [31.0, -32.0, 20.0]


def test_fake_quantize_rounds_half_to_even_like_quantizelinear():
    s = torch.tensor(1.0)
    out = fake_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), s, 0.0, activation_range(8))
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0]


def test_asymmetric_params_include_zero_and_map_the_minimum_to_zero():
    scale, zp = asymmetric_params(-1.0, 3.0, 8)
    assert float(scale) == pytest.approx(4.0 / 255)
    assert float(zp) == 64.0  # round(1 / (4/255)) = round(63.75)
    x = torch.tensor([-1.0, 0.0, 3.0])
    out = fake_quantize(x, scale, zp, activation_range(8, symmetric=False))
    assert out[1].item() == 0.0
    assert out[0].item() == pytest.approx(-64 * float(scale))


def test_conv_transpose_weight_scales_run_along_axis_1():
    w = torch.zeros(2, 3, 1, 1)
    w[0, :, 0, 0] = torch.tensor([1.0, -2.0, 4.0])
    w[1, :, 0, 0] = torch.tensor([-3.0, 0.5, 1.0])
    s = weight_scales(w, axis=1, bits=8)
    assert s.tolist() == pytest.approx([3 / 127, 2 / 127, 4 / 127])


def test_quantize_weight_is_rint_of_w_over_s_and_dequantize_multiplies_back():
    w = torch.tensor([[0.1, -0.2, 0.3], [1.0, 0.5, -0.25]])
    s = weight_scales(w, axis=0, bits=8)
    q = quantize_weight(w, s, axis=0, bits=8)
    expected = np.rint(w.numpy() / s.numpy()[:, None]).astype(np.int8)
    assert q.dtype == np.int8
    assert np.array_equal(q, expected)
    assert q[1, 0] == 127 and q[0, 2] == 127
    back = dequantize_weight(q, s, axis=0)
    assert torch.equal(back, torch.from_numpy(q).float() * s[:, None])


def _brute_force(x: torch.Tensor, start: torch.Tensor) -> tuple[float, float]:
    losses = []
    for i in range(GRID_CANDIDATES):
        s = symmetric_scale(start * (1 - 0.01 * i), 8)
        err = (fake_quantize(x, s, 0.0, activation_range(8)) - x).abs().pow(2.4).mean()
        losses.append((float(err), float(s)))
    return min(losses, key=lambda t: t[0])


def test_grid_search_returns_the_best_of_80_ranges_shrunk_from_the_global_max():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 10000, generator=gen) * 2 - 1
    x[:, 0] = torch.tensor([1.05, 1.1, 1.2, 3.0])  # one outlier per sample, sizes differ
    scale, zp, loss = search_activation_range(x, None, 8)
    best_loss, best_scale = _brute_force(x, torch.tensor(3.0))
    assert zp == 0.0
    assert scale == best_scale
    assert loss == pytest.approx(best_loss, rel=1e-6)
    assert scale < 3.0 / 127  # clipping the rare outliers pays


def test_grid_search_can_start_from_the_mean_of_per_sample_maxima_like_poca():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 10000, generator=gen) * 2 - 1
    x[:, 0] = torch.tensor([1.05, 1.1, 1.2, 3.0])
    scale, _, loss = search_activation_range(x, None, 8, init="mean")
    best_loss, best_scale = _brute_force(x, x.abs().amax(dim=1).mean())
    assert scale == best_scale
    assert loss == pytest.approx(best_loss, rel=1e-6)


def test_grid_search_ignores_masked_out_positions():
    x = torch.linspace(-1, 1, 200).repeat(2, 1)
    with_outlier = x.clone()
    with_outlier[:, 0] = 50.0
    mask = torch.ones_like(x)
    mask[:, 0] = 0
    clean = search_activation_range(x * mask, mask, 8)
    masked = search_activation_range(with_outlier, mask, 8)
    assert masked[0] == clean[0]


def test_max_activation_range_is_the_absolute_maximum():
    scale, zp = max_activation_range(torch.tensor([-3.0, 1.0, 2.0]), 8)
    assert scale == pytest.approx(3.0 / 127)
    assert zp == 0.0


def test_adaround_starts_at_the_float_weight():
    w = torch.tensor([[0.3, -0.71, 1.25]])
    s = torch.tensor([0.1])
    alpha = adaround_init(w, s, axis=0)
    soft = (torch.floor(w / s[:, None]) + rectified_sigmoid(alpha)) * s[:, None]
    assert torch.allclose(soft, w, atol=1e-5)


def test_adaround_hard_rounding_picks_floor_or_ceil():
    w = torch.tensor([[0.34, 0.36, -0.34]])
    s = torch.tensor([0.1])
    alpha = torch.tensor([[-1.0, 1.0, 1.0]])
    q = adaround_integers(w, s, alpha, axis=0, bits=8)
    assert q.tolist() == [[3, 4, -3]]


def test_adaround_beta_anneals_from_20_to_2_after_a_20_percent_warmup():
    assert adaround_beta(0, 100) is None
    assert adaround_beta(19, 100) is None
    assert adaround_beta(20, 100) == pytest.approx(20.0)
    assert adaround_beta(100, 100) == pytest.approx(2.0)
