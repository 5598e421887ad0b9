"""T-Std: the temporal standard deviation of the frame-to-frame change of an output."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avatarq.errors import AvatarqError
from avatarq.measure import compare_sequences, temporal_std


def ramp(t: int = 8, speed: float = 0.01) -> np.ndarray:
    """[t, 3, 4, 4] frames brightening at a constant speed."""
    base = np.linspace(0.2, 0.6, 48).reshape(3, 4, 4)
    return np.stack([base + speed * i for i in range(t)])


def test_constant_speed_motion_has_zero_t_std():
    assert temporal_std(ramp()) == pytest.approx(0.0, abs=1e-15)


def test_a_frozen_sequence_has_zero_t_std():
    assert temporal_std(np.repeat(ramp()[:1], 6, axis=0)) == 0.0


def test_one_step_of_size_a_in_t_frames_is_a_sqrt_of_t_minus_2_over_t_minus_1():
    frames = np.zeros((5, 2, 2))
    frames[3:] = 0.4  # changes: 0, 0, 0.4, 0 over the 4 pairs
    expected = math.sqrt(np.mean((np.array([0, 0, 0.4, 0]) - 0.1) ** 2))
    assert temporal_std(frames) == pytest.approx(expected, rel=1e-12)


def test_comparison_reports_t_std_of_the_output_and_of_the_reference():
    f = ramp()
    q = f.copy()
    q[4:] += 0.05  # a jump: uneven change
    result = compare_sequences(f, q, compute_ssim=False)
    assert result.t_std_reference == pytest.approx(0.0, abs=1e-15)
    assert result.t_std == pytest.approx(temporal_std(q), rel=1e-12)
    assert result.t_std > 0.01


def test_the_reference_against_itself_has_equal_t_stds():
    f = np.random.default_rng(0).random((6, 3, 5, 5))
    result = compare_sequences(f, f, compute_ssim=False)
    assert result.t_std == result.t_std_reference


def test_a_mask_restricts_t_std_to_the_masked_elements():
    f = np.zeros((4, 1, 2, 2))
    f[2:, 0, 0, 0] = 1.0  # only element (0, 0) jumps
    mask = np.array([[[0.0, 1.0], [1.0, 1.0]]])
    result = compare_sequences(f, f, mask=mask, compute_ssim=False)
    assert result.t_std == 0.0


def test_t_std_needs_two_frames():
    with pytest.raises(AvatarqError, match="T-Std needs at least 2 frames, got 1"):
        temporal_std(np.zeros((1, 3)))
