"""The perceptual video metric (JOD): settings, frame reduction, the missing-package error,
and what FovVideoVDP says about identical, noisy and jittering clips (measured, on the CPU).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from avatarq.errors import AvatarqError
from avatarq.measure import PerceptualClip, PerceptualConfig, psnr
from avatarq.measure.perceptual import (
    MAX_JOD,
    available,
    display_models,
    downsample,
    reduction_factor,
    require,
    score,
)

needs_fvvdp = pytest.mark.skipif(
    not available("fvvdp"), reason="pyfvvdp is not installed (pip install 'avatarq[perceptual]')"
)
T, SIDE = 12, 48  # 0.4 s at 30 fps: longer than the metric's 250 ms temporal window


def _reference() -> np.ndarray:
    """A static textured clip float32 [T, SIDE, SIDE, 3] in [0.2, 0.8]."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    base = 0.5 + 0.2 * np.sin(7 * x + 3 * y)[..., None] * np.array([1.0, 0.8, 0.6])
    base += 0.05 * rng.standard_normal((SIDE, SIDE, 3))
    return np.repeat(np.clip(base, 0.2, 0.8)[None], T, axis=0).astype(np.float32)


def _error(amplitude: float) -> np.ndarray:
    """A fixed, spatially smooth error pattern [SIDE, SIDE, 3] of RMS ``amplitude``:
    white noise blurred by a Gaussian of 2 pixels (as a decoder's errors are smooth)."""
    noise = np.random.default_rng(1).standard_normal((SIDE, SIDE, 3))
    f = np.fft.fftfreq(SIDE)
    gain = np.exp(-2 * (np.pi * 2.0) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    e = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * gain[..., None], axes=(0, 1)))
    return (amplitude * e / np.sqrt(np.mean(e**2))).astype(np.float32)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _reference()


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "vmaf"}, "perceptual metric must be one of cvvdp, fvvdp, got 'vmaf'"),
        ({"fps": 0}, "fps must be a positive number, got 0"),
        ({"fps": float("inf")}, "fps must be a positive number"),
        ({"max_size": 8}, "max_size must be an integer >= 16 pixels, got 8"),
        ({"display": ""}, "display must be a display model name"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        PerceptualConfig(**kwargs)


def test_defaults_state_the_display_frame_rate_and_size():
    config = PerceptualConfig()
    assert config.to_dict() == {
        "metric": "fvvdp",
        "display": "standard_fhd",
        "fps": 30.0,
        "max_size": 256,
    }


def test_the_reduction_factor_is_the_smallest_integer_that_fits_the_longer_side():
    assert reduction_factor(1024, 1024, 256) == 4
    assert reduction_factor(1024, 667, 256) == 4
    assert reduction_factor(300, 200, 256) == 2
    assert reduction_factor(256, 100, 256) == 1


def test_downsampling_averages_boxes_and_drops_the_incomplete_edge():
    frames = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)
    out = downsample(frames, 2)
    assert out.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(out[1, 0, 1], frames[1, 0:2, 2:4].mean(axis=(0, 1)))


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyfvvdp", None)  # import pyfvvdp now fails
    with pytest.raises(AvatarqError) as info:
        require("fvvdp")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "perceptual metric fvvdp (FovVideoVDP) needs the package pyfvvdp, which is not "
        "installed; install avatarq's 'perceptual' extra: pip install 'avatarq[perceptual]'"
    )
    assert not available("fvvdp")


def test_clips_of_different_shapes_are_refused(reference):
    with pytest.raises(AvatarqError, match="differ in shape"):
        score(reference, reference[:, :-1])


def test_a_single_frame_is_not_a_video(reference):
    with pytest.raises(AvatarqError, match="T >= 2 frames, got 1"):
        score(reference[:1], reference[:1])


@needs_fvvdp
def test_an_unknown_display_model_lists_the_known_ones(reference):
    with pytest.raises(AvatarqError, match="unknown display model 'crt'.*standard_fhd"):
        score(reference, reference, PerceptualConfig(display="crt"))


@needs_fvvdp
def test_the_package_ships_the_default_display_model():
    assert "24-inch FullHD" in display_models("fvvdp")["standard_fhd"]


# --------------------------------------------------------------------------- the metric


@pytest.fixture(scope="module")
def jods(reference) -> dict[str, float]:
    """JOD of the reference against itself, under constant errors of 40 and 34 dB PSNR,
    and under the 40 dB error with a random sign per frame (temporally white jitter)."""
    if not available("fvvdp"):
        pytest.skip("pyfvvdp is not installed (pip install 'avatarq[perceptual]')")
    e = _error(0.01)
    signs = np.random.default_rng(2).choice([-1.0, 1.0], T).astype(np.float32)
    clips = {
        "self": reference.copy(),
        "constant_40dB": reference + e,
        "constant_34dB": reference + 2 * e,
        "jitter_40dB": reference + signs[:, None, None, None] * e,
    }
    return {k: score(reference, v).jod for k, v in clips.items()}


@pytest.mark.slow
def test_a_clip_against_itself_scores_the_maximum(jods):
    assert jods["self"] == MAX_JOD


@pytest.mark.slow
def test_jod_drops_with_added_noise_and_drops_further_with_more(jods):
    assert jods["constant_40dB"] < MAX_JOD - 0.01
    assert jods["constant_34dB"] < jods["constant_40dB"] - 0.05


@pytest.mark.slow
def test_an_error_that_jitters_scores_lower_than_the_same_error_held_still(reference, jods):
    e = _error(0.01)
    # same PSNR in every frame: only the temporal behaviour differs
    assert psnr(reference[0], reference[0] + e) == pytest.approx(40.0, abs=0.01)
    assert jods["jitter_40dB"] < jods["constant_40dB"] - 0.1


@needs_fvvdp
@pytest.mark.slow
def test_a_clip_collector_crops_to_the_mask_and_reduces_every_frame_alike():
    clip = PerceptualClip(PerceptualConfig(max_size=32))
    rng = np.random.default_rng(3)
    frame = rng.uniform(0.2, 0.8, (120, 90, 3)).astype(np.float32)
    mask = np.zeros((120, 90), np.float32)
    mask[20:100, 10:70] = 1.0  # 80 x 60 foreground; margin 15% of 80 = 12 px each side
    for _ in range(8):
        clip.add(frame, frame, mask)
    result = clip.result()
    # region rows 8..112 (104), cols 0..82 (82): factor ceil(104 / 32) = 4 -> 26 x 20
    assert (result.downsample, result.height, result.width) == (4, 26, 20)
    assert result.frames == 8
    assert result.jod == MAX_JOD
    assert result.seconds_per_frame > 0
