"""Low-bit methods: mask-weighted GPTQ, smoothing, Hadamard rotation, exact bit allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from avatarq.calibration import CalibrationConfig, calibrate, discover_layers
from avatarq.calibration.allocate import (
    candidate_formats,
    layer_bytes,
    parse_size_budget,
    solve,
)
from avatarq.calibration.biases import quantize_bias, quantize_offset, row_block, stored_bytes
from avatarq.calibration.formats import parse_format
from avatarq.calibration.gptq import (
    from_matrix,
    gptq_round,
    layer_hessian,
    masked_output_error,
    nearest_integers,
    patches,
    to_matrix,
)
from avatarq.calibration.hadamard import (
    hadamard_matrix,
    rotate_weight,
    rotation_matrix,
)
from avatarq.calibration.layers import layer_forward, rotate_input
from avatarq.calibration.quantizers import WeightLayout, weight_range, weight_scales
from avatarq.calibration.smoothing import smooth_decoder, smoothing_pairs
from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder
from tiny_dam import tiny_calibration_decoder, tiny_calibration_samples

LAYERS = {
    "deconv_k4s2p1": (nn.ConvTranspose2d(6, 5, 4, 2, 1, bias=False), "conv_transpose", 1),
    "conv_k3s1p1": (nn.Conv2d(6, 5, 3, 1, 1, bias=False), "conv", 0),
    "conv_k4s2p1": (nn.Conv2d(6, 5, 4, 2, 1, bias=False), "conv", 0),
}


# ------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_patches_times_the_weight_matrix_is_the_layer_output(name):
    layer, kind, _ = LAYERS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    y = layer(x)
    cols = patches(layer, x)  # [B, columns, L]
    w2 = to_matrix(layer.weight.detach(), kind)  # [Cout, columns]
    out = torch.einsum("bcl,oc->bol", cols, w2)
    assert torch.allclose(out.reshape(y.shape), y, atol=1e-5)
    assert torch.equal(from_matrix(w2, kind, tuple(layer.weight.shape)), layer.weight.detach())


def _masked_problem(seed: int = 0):
    """A 16 -> 8 k4s2p1 deconv, inputs with correlated channels, and a mask that keeps the
    left half of the output."""
    torch.manual_seed(seed)
    layer = nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False)
    mix = torch.randn(16, 16) / 4 + torch.eye(16)
    x = torch.einsum("bchw,dc->bdhw", torch.randn(24, 16, 8, 8), mix)
    mask = torch.zeros(24, 1, 16, 16)
    mask[..., :8] = 1.0
    return layer, x, mask


def test_gptq_lowers_the_masked_layer_output_error_of_4_bit_rounding():
    layer, x, mask = _masked_problem()
    h = layer_hessian(layer, x, mask, None)
    w2 = to_matrix(layer.weight.detach(), "conv_transpose")
    s2 = to_matrix(
        WeightLayout(1, 0).expand(weight_scales(layer.weight, 1, 4), tuple(layer.weight.shape)),
        "conv_transpose",
    )
    grid = weight_range(4)
    rtn = masked_output_error(w2, nearest_integers(w2, s2, grid) * s2, h)
    q = gptq_round(w2, s2, h, grid)
    gptq = masked_output_error(w2, q * s2, h)
    assert gptq < 0.7 * rtn
    assert q.abs().max() <= 7 and torch.equal(q, q.round())


def test_the_hessian_error_equals_the_masked_output_error_of_the_layer():
    layer, x, mask = _masked_problem(1)
    h = layer_hessian(layer, x, mask, None)
    w = layer.weight.detach()
    approx = w + 0.01 * torch.randn_like(w)
    with torch.no_grad():
        direct = (((layer_forward(layer, x, approx) - layer(x)) ** 2) * mask).sum()
    via_h = masked_output_error(
        to_matrix(w, "conv_transpose"), to_matrix(approx, "conv_transpose"), h
    )
    assert via_h == pytest.approx(float(direct), rel=1e-4)


def test_the_per_phase_hessian_of_a_k4s2p1_deconv_equals_the_stuffed_input_one(monkeypatch):
    import avatarq.calibration.gptq as gptq

    layer, x, mask = _masked_problem(3)
    crops, window = x[:, :, :6, :6], (2, 8)  # a crop: output window 8 at offset 2
    masks = mask[..., :8, :8]
    fast = layer_hessian(layer, crops, masks, window)
    monkeypatch.setattr(gptq, "_is_k4s2p1", lambda module: False)
    stuffed = layer_hessian(layer, crops, masks, window)
    assert torch.allclose(fast, stuffed, rtol=1e-5, atol=1e-6 * float(stuffed.abs().max()))


def test_positions_outside_the_mask_do_not_enter_the_hessian():
    layer, x, mask = _masked_problem(2)
    x2 = x.clone()
    x2[..., 6:] = 100.0  # inputs that only reach masked-out output columns (>= 11)
    assert torch.allclose(layer_hessian(layer, x, mask, None), layer_hessian(layer, x2, mask, None))


def test_calibrate_with_gptq_stores_learned_integers_and_beats_nearest_on_the_cache():
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    config = CalibrationConfig(bits="w4a8", gptq=True, iters=0, crop=8, sensitivity="none")
    artifact = calibrate(decoder, samples, config)
    deconv = artifact["dec.texture_decoder.upsample.0.conv1.deconv"]
    assert deconv.rounding == "gptq" and deconv.weight_int.dtype == np.int8
    assert np.abs(deconv.weight_int).max() <= 7
    errors = [layer.loss["gptq"] for layer in artifact.layers]
    assert all(e["gptq"] <= e["nearest"] * 1.0001 for e in errors)
    assert sum(e["gptq"] for e in errors) < sum(e["nearest"] for e in errors)


# ------------------------------------------------------------------ smoothing
@pytest.mark.parametrize("arch", ["base", "bilinear", "non", "warp"])
def test_smoothing_leaves_the_fp32_decoder_unchanged_to_float_rounding(arch):
    torch.manual_seed(0)
    model = DeepAppearanceModel(DAMConfig(arch=arch, z_dim=8, tex_size=16, n_vertices=10, n_cams=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("conv1.bias", "conv2.bias")):
                p.normal_(0, 0.3)
    decoder = DeployableDecoder(model)
    z, view = torch.randn(4, 8), torch.nn.functional.normalize(torch.randn(4, 3) + 2, dim=1)
    with torch.no_grad():
        before = decoder(z, view)
    pairs = smoothing_pairs(decoder)
    assert pairs
    gen = np.random.default_rng(0)
    scales = {
        p.consumer: np.exp(
            gen.normal(0, 1.0, decoder.get_submodule(p.consumer).weight.shape[p.consumer_axis])
        ).astype(np.float32)
        for p in pairs
    }
    smooth_decoder(decoder, pairs, scales)
    with torch.no_grad():
        after = decoder(z, view)
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    changed = decoder.get_submodule(pairs[0].consumer).weight
    assert not torch.allclose(changed, changed * 0 + changed.mean())  # really rescaled


def test_smoothing_pairs_follow_the_texture_chain_and_skip_residual_blocks():
    base = smoothing_pairs(tiny_calibration_decoder())
    assert [(p.producer, p.consumer) for p in base] == [
        ("dec.texture_fc", "dec.texture_decoder.upsample.0.conv1.deconv"),
        (
            "dec.texture_decoder.upsample.0.conv1.deconv",
            "dec.texture_decoder.upsample.0.conv2.deconv",
        ),
    ]
    assert base[0].group == 16 and base[1].biases == ("dec.texture_decoder.upsample.0.conv1.bias",)
    res = DeployableDecoder(
        DeepAppearanceModel(DAMConfig(arch="res", z_dim=8, tex_size=16, n_vertices=10, n_cams=1))
    )
    assert [p.consumer for p in smoothing_pairs(res)] == [
        "dec.texture_decoder.upsample.0.conv1.deconv"
    ]


def test_smoothing_flattens_the_per_channel_input_ranges_of_a_smoothed_layer():
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    artifact = calibrate(
        decoder,
        samples,
        CalibrationConfig(smooth=True, smooth_alpha=0.5, iters=0, crop=8, sensitivity="none"),
    )
    consumer = "dec.texture_decoder.upsample.0.conv2.deconv"
    scales = artifact.smoothing_scales[consumer]
    assert scales.shape == (8,) and (scales > 0).all()
    assert float(np.exp(np.log(scales).mean())) == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------ Hadamard
def test_hadamard_matrices_are_orthonormal_and_symmetric():
    h = hadamard_matrix(16)
    assert np.allclose(h @ h.T, np.eye(16)) and np.allclose(h, h.T)
    r = rotation_matrix(5)  # padded to 8
    assert r.shape == (8, 5) and torch.allclose(r.t() @ r, torch.eye(5), atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(5, 3), nn.Conv2d(6, 4, 3, 1, 1), nn.ConvTranspose2d(6, 4, 4, 2, 1)],
    ids=["linear_padded", "conv_padded", "deconv_padded"],
)
def test_a_rotated_layer_computes_the_same_output(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 5) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    in_axis = 0 if isinstance(layer, nn.ConvTranspose2d) else 1
    r = rotation_matrix(x.shape[1])
    w = rotate_weight(layer.weight, in_axis, r)
    assert w.shape[in_axis] == 8
    out = layer_forward(layer, rotate_input(x, r), w)
    assert torch.allclose(out, layer(x), atol=1e-5)


# ------------------------------------------------------------------ allocation
def _brute_force(sizes, costs, budget):
    best = None
    for choice in itertools.product(*[range(len(r)) for r in sizes]):
        size = sum(sizes[i][c] for i, c in enumerate(choice))
        cost = sum(costs[i][c] for i, c in enumerate(choice))
        if size <= budget and (best is None or cost < best[0]):
            best = (cost, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocator_returns_the_brute_force_optimum(seed):
    gen = np.random.default_rng(seed)
    rows, choices = 7, 3
    sizes = [sorted(gen.integers(1, 40, choices).tolist(), reverse=True) for _ in range(rows)]
    costs = [sorted(gen.random(choices).tolist()) for _ in range(rows)]  # bigger = better
    budget = int(sum(min(r) for r in sizes) + gen.integers(0, 60))
    choice, size, cost, _ = solve(sizes, costs, budget)
    best_cost, _ = _brute_force(sizes, costs, budget)
    assert cost == pytest.approx(best_cost, abs=1e-12)
    assert size <= budget
    assert size == sum(sizes[i][c] for i, c in enumerate(choice))


def test_an_impossible_budget_names_the_smallest_possible_size():
    with pytest.raises(AvatarqError, match="smallest possible is 3"):
        solve([[2, 1], [4, 2]], [[0, 1], [0, 1]], 2)


@pytest.mark.parametrize(
    "text, value, unit", [("3.5MB", 3.5, "MB"), ("12", 12.0, "MB"), ("4.5bpp", 4.5, "bpp")]
)
def test_size_budgets_parse(text, value, unit):
    budget = parse_size_budget(text)
    assert (budget.value, budget.unit) == (value, unit)


@pytest.mark.parametrize("bad", ["-1MB", "0", "fast", "3 GB"])
def test_bad_size_budgets_are_refused(bad):
    with pytest.raises(AvatarqError, match="--size-budget"):
        parse_size_budget(bad)


def test_int4_layers_cost_half_a_byte_per_weight_plus_scales_and_bias():
    info = next(i for i in discover_layers(tiny_calibration_decoder()) if i.name == "dec.mesh_fc")
    n = info.weight_shape[0] * info.weight_shape[1]
    out = info.weight_shape[0]
    assert layer_bytes(info, parse_format("w4a8")) == n // 2 + 4 * out + 4 * out
    assert layer_bytes(info, parse_format("w8a8")) == n + 4 * out + 4 * out
    assert layer_bytes(info, parse_format("fp16")) == 2 * n + 2 * out
    assert candidate_formats("w4a4") == ["w4a4", "w8a4", "fp16"]


def test_calibrate_under_a_budget_fits_it_and_records_the_allocation():
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    config = CalibrationConfig(bits="w4a8", size_budget="5bpp", iters=0, crop=8, sensitivity="none")
    artifact = calibrate(decoder, samples, config)
    alloc = artifact.allocation
    assert alloc["size"] <= alloc["budget"]
    assert set(artifact.precision.values()) <= {"w4a8", "w8a8", "fp16"}
    assert alloc["formats"] == artifact.precision
    assert all(set(v) == {"w4a8", "w8a8", "fp16"} for v in alloc["omega_table"].values())


def test_a_budget_below_every_allocation_fails_before_calibrating():
    decoder, samples = tiny_calibration_decoder(), tiny_calibration_samples(8)
    with pytest.raises(AvatarqError, match="below the smallest allocation"):
        calibrate(decoder, samples, CalibrationConfig(bits="w4a8", size_budget="1bpp"))


# ------------------------------------------------------------------ texel biases
def test_texel_bias_formats_bound_their_error():
    gen = np.random.default_rng(0)
    b = gen.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    stored, scale, values = quantize_bias(b, "fp16")
    assert stored.dtype == np.float16 and scale is None
    assert np.abs(values - b).max() <= np.abs(b).max() * 2.0**-11
    stored, scale, values = quantize_bias(b, "int8")
    assert stored.dtype == np.int8 and scale.shape == (3,)
    assert (np.abs(values - b) <= scale.reshape(1, 3, 1, 1) / 2 + 1e-7).all()


def test_int4_texel_biases_have_a_scale_per_64_texels_of_a_row():
    b = np.random.default_rng(0).normal(0, 1, (1, 3, 4, 128)).astype(np.float32)
    stored, scale, values = quantize_bias(b, "int4")
    assert np.abs(stored).max() == 7 and stored.shape == b.shape
    blocks = b.reshape(3, 4, 2, 64)
    assert np.allclose(scale, np.abs(blocks).max(axis=-1) / 7)
    step = np.repeat(scale, 64, axis=-1).reshape(b.shape)
    assert (np.abs(values - b) <= step / 2 + 1e-7).all()


def test_int4_bias_scales_of_another_shape_are_refused():
    b = np.zeros((1, 3, 4, 128), np.float32)
    with pytest.raises(AvatarqError, match=r"needs scales \[3, 4, 2\]"):
        quantize_bias(b, "int4", np.ones(3, np.float32))


def test_a_blocked_offset_is_within_half_a_step_of_each_block():
    offset = np.random.default_rng(0).uniform(10, 250, (1, 3, 4, 128)).astype(np.float32)
    parts, values = quantize_offset(offset, "uint8-blocks")
    assert parts["codes"].shape == (1, 3, 4, 2, 64) and parts["codes"].dtype == np.uint8
    assert parts["base"].shape == parts["scale"].shape == (1, 3, 4, 2, 1)
    step = np.repeat(parts["scale"], 64, axis=-1).reshape(offset.shape)
    assert (np.abs(values - offset) <= step / 2 + 1e-4).all()


def test_a_row_block_divides_the_row():
    assert [row_block(w) for w in (1024, 48, 20, 7)] == [64, 16, 4, 1]


def test_stored_bytes_count_codes_and_scales():
    shape = (1, 3, 16, 64)
    n = 3 * 16 * 64
    assert stored_bytes(shape, "fp16") == 2 * n
    assert stored_bytes(shape, "int8") == n + 12
    assert stored_bytes(shape, "int4") == n // 2 + 4 * (n // 64)
    assert stored_bytes(shape, "uint8-blocks") == n + 8 * (n // 64)
