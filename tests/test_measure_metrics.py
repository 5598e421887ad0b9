"""Fidelity, temporal-stability and gate metrics of avatarq.measure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.measure import (
    GATE_METRICS,
    Gate,
    SequenceAccumulator,
    SequenceComparison,
    Tolerances,
    compare_sequences,
    evaluate_gates,
    parse_gates,
    psnr,
    ssim,
)

T, C, H, W = 8, 3, 16, 16


def smooth_sequence(t: int = T, seed: int = 0) -> np.ndarray:
    """Float32 frames [T, C, H, W] in [0.25, 0.75], drifting smoothly, dyadic values.

    Multiples of 2^-10 keep (F + d) - F == d exact for dyadic d, so expectations can be
    exact equalities.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(256, 512, size=(C, H, W))
    drift = np.arange(t)[:, None, None, None]
    return ((base[None] + drift) / 1024).astype(np.float32)


# --------------------------------------------------------------------------- PSNR


def test_psnr_of_uniform_error_d_is_10_log10_one_over_d_squared():
    ref = np.full((C, H, W), 0.5)
    d = 0.01
    assert psnr(ref, ref + d) == pytest.approx(10 * math.log10(1 / d**2), rel=1e-12)


def test_psnr_of_identical_images_is_inf():
    ref = smooth_sequence()[0]
    assert psnr(ref, ref) == math.inf


def test_psnr_mask_ignores_error_outside_the_mask():
    ref = np.full((C, H, W), 0.5)
    test = ref + 0.01
    test[:, :, W // 2 :] += 0.3  # large error on the right half
    mask = np.zeros((1, H, W), dtype=bool)
    mask[:, :, : W // 2] = True
    assert psnr(ref, test, mask) == pytest.approx(40.0, rel=1e-12)


def test_psnr_mask_weights_each_element():
    ref = np.zeros((1, 1, 2))
    test = np.array([[[0.1, 0.2]]])
    weights = np.array([3.0, 1.0])  # mse = (3 * 0.01 + 1 * 0.04) / 4
    assert psnr(ref, test, weights) == pytest.approx(10 * math.log10(4 / 0.07), rel=1e-12)


def test_psnr_accepts_torch_tensors_like_numpy():
    ref = smooth_sequence()[0]
    test = ref + np.float32(2**-6)
    assert psnr(torch.from_numpy(ref), torch.from_numpy(test)) == psnr(ref, test)


def test_psnr_refuses_integer_images():
    img = np.zeros((C, H, W), dtype=np.uint8)
    with pytest.raises(AvatarqError, match="dtype uint8"):
        psnr(img, img)


def test_psnr_refuses_shape_mismatch():
    with pytest.raises(AvatarqError, match=r"same shape, got \[3, 16, 16\] and \[3, 16, 15\]"):
        psnr(np.zeros((C, H, W)), np.zeros((C, H, W - 1)))


# --------------------------------------------------------------------------- SSIM


def direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM by its definition: a full 2-D 11x11 Gaussian window at every valid position."""
    r = np.arange(11) - 5.0
    win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[ch, i : i + 11, j : j + 11], y[ch, i : i + 11, j : j + 11]
                mx, my = (win * a).sum(), (win * b).sum()
                vx = (win * (a - mx) ** 2).sum()
                vy = (win * (b - my) ** 2).sum()
                cxy = (win * (a - mx) * (b - my)).sum()
                values.append(
                    (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                )
    return float(np.mean(values))


def test_ssim_of_identical_images_is_exactly_one():
    img = np.random.default_rng(1).random((C, 20, 24))
    assert ssim(img, img) == 1.0


def test_ssim_matches_direct_windowed_computation():
    rng = np.random.default_rng(2)
    x = rng.random((2, 17, 19))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(direct_ssim(x, y), rel=1e-12)


def test_ssim_of_two_constant_images_is_the_luminance_term():
    a, b = 0.3, 0.6
    expected = (2 * a * b + 0.01**2) / (a**2 + b**2 + 0.01**2)
    assert ssim(np.full((H, W), a), np.full((H, W), b)) == pytest.approx(expected, rel=1e-12)


def test_ssim_mask_averages_only_masked_window_centres():
    rng = np.random.default_rng(3)
    x = rng.random((1, 24, 24))
    y = x.copy()
    y[:, :, 12:] = rng.random((1, 24, 12))  # differs on the right, far from column 5..8
    mask = np.zeros((24, 24))
    mask[:, :3] = 1.0  # only columns whose windows (radius 5) stay on the left half
    mask[:, 5:7] = 1.0
    assert ssim(x, y, mask) == 1.0


def test_ssim_refuses_images_smaller_than_the_window():
    with pytest.raises(AvatarqError, match="H, W >= 11"):
        ssim(np.zeros((3, 10, 64)), np.zeros((3, 10, 64)))


# --------------------------------------------------------------------------- sequences


def test_fp32_against_itself_has_zero_temporal_error_and_infinite_psnr():
    f = smooth_sequence()
    r = compare_sequences(f, f.copy())
    assert r.tde == 0.0
    assert r.tde_rms == 0.0
    assert r.flicker_excess == 0.0
    assert r.jitter_ratio == 0.0
    assert r.psnr_mean == math.inf and r.psnr_min == math.inf and r.psnr_std == 0.0
    assert np.all(r.psnr_per_frame == math.inf)
    assert r.ssim_mean == 1.0
    assert r.max_abs_error == 0.0


def test_constant_error_has_zero_jitter_and_zero_tde():
    f = smooth_sequence()
    r = compare_sequences(f, f + np.float32(2**-7), compute_ssim=False)
    assert r.jitter_ratio == 0.0
    assert r.tde == 0.0
    assert r.flicker_excess == 0.0
    assert r.mean_abs_error == 2**-7


def test_alternating_sign_error_has_jitter_ratio_exactly_two():
    f = smooth_sequence()
    signs = np.array([1, -1] * (T // 2), dtype=np.float32)[:, None, None, None]
    r = compare_sequences(f, f + signs * np.float32(2**-7), compute_ssim=False)
    assert r.jitter_ratio == 2.0
    assert r.tde == 2 * 2**-7


def test_temporally_white_error_has_jitter_ratio_near_sqrt2():
    # With iid errors, J^2 - 2 ~= -2 sum(e_t e_{t-1}) / sum(e^2), whose std is 2/sqrt(M)
    # for M = N (T-1) element pairs, so std(J) ~= 1/sqrt(2 M) = 0.0014 here. 6 sigma.
    t, n = 64, 4096
    f = np.full((t, 1, 64, 64), 0.5)
    noise = 0.01 * np.random.default_rng(4).standard_normal(f.shape)
    r = compare_sequences(f, f + noise, compute_ssim=False)
    assert abs(r.jitter_ratio - math.sqrt(2)) < 6 / math.sqrt(2 * n * (t - 1))


def test_flicker_excess_of_per_frame_offsets_is_mean_offset_change():
    f = np.repeat(smooth_sequence()[:1], 4, axis=0).astype(np.float64)  # static reference
    offsets = np.array([0.0, 0.02, -0.01, 0.03])  # |changes| 0.02, 0.03, 0.04
    r = compare_sequences(f, f + offsets[:, None, None, None], compute_ssim=False)
    assert r.flicker_excess == pytest.approx(0.03, rel=1e-12)
    np.testing.assert_allclose(r.flicker_excess_per_frame, [0.02, 0.03, 0.04], rtol=1e-12)


def test_per_frame_series_match_the_single_image_metrics():
    f = smooth_sequence()
    q = f + 0.01 * np.random.default_rng(8).standard_normal(f.shape).astype(np.float32)
    r = compare_sequences(f, q)
    assert r.psnr_per_frame.tolist() == [psnr(a, b) for a, b in zip(f, q, strict=True)]
    assert r.ssim_per_frame.tolist() == [ssim(a, b) for a, b in zip(f, q, strict=True)]
    assert r.psnr_min == min(r.psnr_per_frame)
    assert r.psnr_std == pytest.approx(np.std(r.psnr_per_frame), rel=1e-12)


def test_tde_and_tde_rms_of_known_error_changes():
    f = np.full((3, 1, 12, 12), 0.5)
    e = np.zeros_like(f)
    e[1] = 0.01
    e[2, :, :6] = 0.01  # half the frame drops back to zero error
    r = compare_sequences(f, f + e, compute_ssim=False)
    np.testing.assert_allclose(r.tde_per_frame, [0.01, 0.005], rtol=1e-10)
    assert r.tde == pytest.approx(0.0075, rel=1e-10)
    assert r.tde_rms == pytest.approx(math.sqrt((0.01**2 + 0.01**2 / 2) / 2), rel=1e-10)


def test_static_mask_ignores_flicker_outside_the_mask():
    f = smooth_sequence()
    signs = np.array([1, -1] * (T // 2), dtype=np.float32)[:, None, None, None]
    q = f + np.float32(2**-7)
    q[:, :, :, W // 2 :] = f[:, :, :, W // 2 :] + signs * np.float32(2**-5)
    mask = np.zeros((1, H, W), dtype=bool)
    mask[..., : W // 2] = True
    masked = compare_sequences(f, q, mask=mask)
    assert masked.jitter_ratio == 0.0 and masked.tde == 0.0
    assert masked.max_abs_error == 2**-7
    assert masked.masked
    assert compare_sequences(f, q, compute_ssim=False).jitter_ratio > 1.0


def test_per_frame_masks_follow_each_frame():
    f = np.full((2, 1, 12, 12), 0.5)
    q = f + 0.01
    q[1, :, :, 6:] += 0.2  # new error on frame 1, right half
    masks = np.ones((2, 1, 12, 12), dtype=bool)
    masks[1, :, :, 6:] = False
    r = compare_sequences(f, q, mask=masks, compute_ssim=False)
    np.testing.assert_allclose(r.psnr_per_frame, [40.0, 40.0], rtol=1e-10)
    assert r.tde == pytest.approx(0.0, abs=1e-15)


def test_generator_frames_give_the_same_result_as_arrays():
    f = smooth_sequence()
    q = f + 0.003 * np.random.default_rng(5).standard_normal(f.shape).astype(np.float32)
    whole = compare_sequences(f, q)
    streamed = compare_sequences((x for x in f), iter(list(q)))
    assert streamed.to_dict() == whole.to_dict()


def test_accumulator_fed_frame_by_frame_matches_compare_sequences():
    f = smooth_sequence()
    q = f + 0.003 * np.random.default_rng(6).standard_normal(f.shape).astype(np.float32)
    acc = SequenceAccumulator()
    for a, b in zip(f, q, strict=True):
        acc.add(torch.from_numpy(a), torch.from_numpy(b))
    assert acc.result().to_dict() == compare_sequences(f, q).to_dict()


def test_sequences_of_different_lengths_are_refused():
    f = smooth_sequence()
    with pytest.raises(AvatarqError, match="different lengths"):
        compare_sequences(f, f[:-1])


def test_a_single_frame_is_refused():
    with pytest.raises(AvatarqError, match="at least 2 frames, got 1"):
        compare_sequences(smooth_sequence(1), smooth_sequence(1))


def test_mask_selecting_nothing_is_refused():
    f = smooth_sequence()
    with pytest.raises(AvatarqError, match="selects nothing"):
        compare_sequences(f, f, mask=np.zeros((H, W), dtype=bool))


# --------------------------------------------------------------------------- results


def noisy_comparison(**tolerances: float) -> SequenceComparison:
    f = smooth_sequence()
    q = f + 0.01 * np.random.default_rng(7).standard_normal(f.shape).astype(np.float32)
    return compare_sequences(f, q, tolerances=Tolerances(**tolerances))


def test_comparison_is_true_when_no_tolerance_is_set():
    assert bool(noisy_comparison()) is True


def test_comparison_is_false_with_a_named_failure_when_a_tolerance_is_violated():
    r = noisy_comparison(min_psnr=60.0, max_jitter_ratio=2.0)
    assert bool(r) is False
    assert len(r.failures()) == 1 and r.failures()[0].startswith("psnr_mean ")
    assert "< min_psnr 60 dB" in r.failures()[0]


def test_with_tolerances_rejudges_the_same_numbers():
    r = noisy_comparison(max_tde=0.0)
    assert not r
    relaxed = r.with_tolerances(Tolerances(max_tde=1.0))
    assert relaxed and relaxed.tde == r.tde


def test_to_dict_is_strict_json_and_round_trips():
    f = smooth_sequence()
    q = f.copy()
    q[3:] += np.float32(2**-8)  # frames 0..2 identical: PSNR inf there
    r = compare_sequences(f, q, tolerances=Tolerances(min_psnr=30.0))
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["psnr_per_frame"][0] == "Infinity" and d["psnr_mean"] == "Infinity"
    assert d["psnr_std"] == "Infinity"  # some frames inf, some finite
    assert d["passed"] is True
    back = SequenceComparison.from_dict(json.loads(text))
    assert back.to_dict() == d


def test_tolerances_round_trip_through_json_and_reject_bad_values():
    tol = Tolerances(min_psnr=40.0, max_jitter_ratio=0.5)
    assert Tolerances.from_dict(json.loads(json.dumps(tol.to_dict()))) == tol
    with pytest.raises(AvatarqError, match="max_tde must be >= 0"):
        Tolerances(max_tde=-1.0)
    with pytest.raises(AvatarqError, match="version 2"):
        Tolerances(version=2)


# --------------------------------------------------------------------------- gates


def test_parse_gates_reads_metrics_ops_and_thresholds():
    gates = parse_gates("psnr>=40,J<=0.5, p99_ms <= 20,tde<0.01")
    assert gates == [
        Gate("psnr", ">=", 40.0),
        Gate("jitter_ratio", "<=", 0.5),
        Gate("p99_ms", "<=", 20.0),
        Gate("tde", "<", 0.01),
    ]
    assert [str(g) for g in gates] == ["psnr>=40", "jitter_ratio<=0.5", "p99_ms<=20", "tde<0.01"]


def test_parse_gates_names_an_unknown_metric_and_lists_the_known_ones():
    with pytest.raises(AvatarqError) as err:
        parse_gates("psnr>=40,lpips<=0.1")
    msg = str(err.value)
    assert "unknown gate metric 'lpips' in 'lpips<=0.1'" in msg
    assert "psnr, psnr_min, ssim, J (jitter_ratio), tde, fe, jod, p50_ms" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", ["psnr=40", "psnr=>40", "psnr!=40", "psnr 40", "psnr>=", ""])
def test_parse_gates_refuses_a_malformed_operator(bad):
    with pytest.raises(AvatarqError, match="malformed gate|no gate given"):
        parse_gates(f"J<=0.5,{bad}" if bad else bad)


def test_parse_gates_refuses_a_non_numeric_threshold():
    with pytest.raises(AvatarqError, match="threshold 'fast' is not a finite number"):
        parse_gates("fps>=fast")


def test_gate_check_compares_and_nan_fails():
    g = Gate("p99_ms", "<=", 20.0)
    assert g.check(20.0) and not g.check(20.5) and not g.check(math.nan)
    assert Gate("psnr", ">", 40.0).check(math.inf)


def test_evaluate_gates_checks_each_gate_against_its_value():
    gates = parse_gates("psnr>=40,J<=0.5,fps>60")
    results = evaluate_gates(gates, {"psnr": 41.0, "jitter_ratio": 0.7, "fps": 120.0, "x": 1.0})
    assert [r.passed for r in results] == [True, False, True]
    assert [r.value for r in results] == [41.0, 0.7, 120.0]
    assert str(results[1]) == "jitter_ratio<=0.5: 0.7 FAIL"


def test_evaluate_gates_refuses_a_metric_the_run_did_not_measure():
    with pytest.raises(AvatarqError, match="needs metric 'p99_ms'.*measured: psnr"):
        evaluate_gates(parse_gates("p99_ms<=20"), {"psnr": 41.0})


def test_comparison_gate_values_use_gate_metric_names():
    r = noisy_comparison()
    values = r.gate_values()
    assert set(values) <= set(GATE_METRICS)
    assert values["jitter_ratio"] == r.jitter_ratio and values["fe"] == r.flicker_excess
