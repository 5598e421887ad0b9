"""The one comparator on plain decoders with known answers, and the smooth clip."""

import math

import numpy as np
import pytest

from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.errors import AvatarqError
from avatarq.measure import Tolerances, compare


class Offset:
    """texture = z tiled into [B, 1, 4, 4] + offset; vertices = view + 2 * offset."""

    def __init__(self, name: str, offset: float = 0.0) -> None:
        self.name, self.offset = name, offset

    def run(self, feeds):
        z = feeds["z"]
        texture = np.repeat(z[:, None, :1, None], 16, axis=2).repeat(16, axis=3) + self.offset
        return texture, feeds["view"] + 2 * self.offset


def _inputs(n: int = 4) -> DecoderInputs:
    z = (np.arange(n * 2, dtype=np.float32) / 8).reshape(n, 2)  # dyadic: exact sums
    return DecoderInputs.from_z_view(z, np.tile([[0.0, 0.0, 1.0]], (n, 1)))


def test_a_constant_offset_has_exact_errors_and_no_temporal_error():
    result = compare(Offset("ref"), Offset("cand", 0.25), _inputs(), peak=1.0)
    assert result.texture_max_abs_error == 0.25
    assert result.vertices_max_abs_error == 0.5
    assert result.texture.psnr_all == pytest.approx(10 * math.log10(1 / 0.0625))
    assert result.texture.tde == 0.0 and result.texture.jitter_ratio == 0.0


def test_the_peak_scales_the_image_metrics_not_the_errors():
    result = compare(Offset("ref"), Offset("cand", 0.25), _inputs(), peak=255.0)
    assert result.texture_max_abs_error == 0.25
    assert result.texture.max_abs_error == pytest.approx(0.25 / 255)


def test_without_a_peak_the_reference_first_frame_range_is_used():
    inputs = DecoderInputs.from_z_view(
        np.array([[0.0, 0.0], [2.0, 0.0]], np.float32), np.tile([[0.0, 0.0, 1.0]], (2, 1))
    )

    class Ramp(Offset):
        def run(self, feeds):
            tex = (
                np.arange(16, dtype=np.float32)
                .reshape(1, 1, 4, 4)
                .repeat(4, axis=2)
                .repeat(4, axis=3)
                * 0.5
                + feeds["z"][:, :1, None, None]
            )
            return tex + self.offset, feeds["view"]

    result = compare(Ramp("ref"), Ramp("cand", 0.75), inputs)
    assert result.peak == 7.5


def test_min_psnr_all_judges_the_pooled_error():
    result = compare(
        Offset("ref"), Offset("cand", 0.1), _inputs(), Tolerances(min_psnr_all=21.0), peak=1.0
    )
    assert not result and result.failures()[0].startswith("psnr_all")


def test_outputs_of_different_shapes_are_a_user_error():
    class Wrong(Offset):
        def run(self, feeds):
            texture, vertices = super().run(feeds)
            return texture[:, :, :12], vertices

    with pytest.raises(AvatarqError, match="output texture: reference has shape"):
        compare(Offset("ref"), Wrong("cand"), _inputs())


def test_the_smooth_clip_is_seeded_and_moves_in_small_steps():
    a, b = smooth_clip(16, 20, seed=3), smooth_clip(16, 20, seed=3)
    assert a.z.dtype == a.view.dtype == np.float32 and a.z.shape == (20, 16)
    np.testing.assert_array_equal(a.z, b.z)
    assert a.clips == (tuple(range(20)),)
    step = np.linalg.norm(np.diff(a.z, axis=0), axis=1).max()
    assert step < 0.5 * np.linalg.norm(a.z, axis=1).mean()


def test_the_smooth_clip_views_stay_in_their_cone():
    clip = smooth_clip(8, 200, seed=1, front=(0.0, 0.0, 1.0), cone_deg=20.0)
    angles = np.degrees(np.arccos(np.clip(clip.view @ np.array([0.0, 0.0, 1.0]), -1, 1)))
    assert np.allclose(np.linalg.norm(clip.view, axis=1), 1.0, atol=1e-6)
    assert angles.max() <= 20.0 * math.sqrt(2) + 1e-3 and angles.max() > 5.0


def test_the_smooth_clip_takes_a_recorded_latent_distribution():
    mean, std = np.full(4, 3.0), np.full(4, 0.1)
    clip = smooth_clip(4, 400, z_mean=mean, z_std=std)
    assert abs(float(clip.z.mean()) - 3.0) < 0.05 and abs(float(clip.z.std()) - 0.1) < 0.03
