"""Calibration samples: seeded, recorded, hashed; from a capture or a latent sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarq.calibration import CalibrationSamples, samples_from_capture, samples_from_latents
from avatarq.core.inputs import DecoderInputs
from avatarq.data.capture import MultifaceCapture
from avatarq.data.encode import encode_frames
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel


def _samples(z: torch.Tensor) -> CalibrationSamples:
    return CalibrationSamples.of(
        z, torch.tensor([[0.0, 0, 1]] * len(z)), tuple(("s", str(i), "c") for i in range(len(z)))
    )


def test_hash_is_stable_and_follows_the_tensors():
    z = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert _samples(z).hash == _samples(z.clone()).hash
    changed = z.clone()
    changed[1, 2] += 1e-6
    assert _samples(changed).hash != _samples(z).hash


def test_clips_must_not_share_samples():
    with pytest.raises(AvatarqError, match="share"):
        CalibrationSamples.of(
            torch.zeros(3, 2), torch.zeros(3, 3), (("", "", ""),) * 3, clips=((0, 1), (1, 2))
        )


@pytest.fixture(scope="module")
def sequence() -> DecoderInputs:
    gen = np.random.default_rng(0)
    t = 40
    return DecoderInputs.from_z_view(
        gen.normal(size=(t, 6)).astype(np.float32),
        np.tile(np.float32([0, 0, 1]), (t, 1)),
        ids=tuple(("", f"{i:06d}", "") for i in range(t)),
    )


def test_latent_samples_are_seeded(sequence):
    a = samples_from_latents(sequence, n_random=10, n_clips=2, clip_length=5, seed=3)
    b = samples_from_latents(sequence, n_random=10, n_clips=2, clip_length=5, seed=3)
    c = samples_from_latents(sequence, n_random=10, n_clips=2, clip_length=5, seed=4)
    assert a.ids == b.ids and a.hash == b.hash
    assert a.hash != c.hash
    assert len(a) == 20 and a.M is None


def test_latent_clips_are_consecutive_steps_in_order(sequence):
    samples = samples_from_latents(sequence, n_random=4, n_clips=2, clip_length=5, seed=0)
    assert [len(c) for c in samples.clips] == [5, 5]
    for clip in samples.clips:
        frames = [int(samples.ids[i][1]) for i in clip]
        assert frames == list(range(frames[0], frames[0] + 5))
        assert torch.equal(samples.z[list(clip)], torch.from_numpy(sequence.z[frames]))


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> MultifaceCapture:
    config = SyntheticCaptureConfig(
        texture_size=16,
        n_cameras=2,
        segment_frames=(4, 4),
        image_height=64,
        image_width=64,
        mesh_bands=8,
        mesh_sectors=8,
        camera_textures_per_frame=0,
    )
    return MultifaceCapture(write_synthetic_capture(tmp_path_factory.mktemp("cap") / "c", config))


def test_capture_samples_use_the_encoder_mean_and_the_camera(capture):
    torch.manual_seed(0)
    n_vertices = capture.vert_mean.size // 3
    model = DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=16, n_vertices=n_vertices, n_cams=2))
    samples = samples_from_capture(model, capture, n_random=5, n_clips=1, clip_length=3, seed=0)
    assert len(samples) == 8 and samples.clips == ((5, 6, 7),)
    seg, frame, cam = samples.ids[2]
    assert torch.allclose(samples.z[2], encode_frames(model, capture, [(seg, frame)])[0])
    assert np.allclose(samples.view[2].numpy(), capture.view_direction(seg, frame, cam))
    assert np.allclose(samples.M[2].numpy(), capture.projection(seg, frame, cam))
    clip_cams = {samples.ids[i][2] for i in samples.clips[0]}
    assert len(clip_cams) == 1
    assert samples.topology is not None and samples.resolution == capture.image_size
    record = samples.describe()
    assert record["hash"] == samples.hash and record["cameras"] is True
