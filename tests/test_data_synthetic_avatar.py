"""The cached synthetic avatar: synth.json is its typed record and its cache key."""

from __future__ import annotations

from avatarq.data.synthetic import RECORD_FILE, make_synthetic_avatar
from avatarq.data.synthetic_capture import SyntheticCaptureConfig
from avatarq.data.train import TrainConfig

CAPTURE = SyntheticCaptureConfig(
    texture_size=32,
    n_cameras=2,
    segment_frames=(3, 3),
    image_height=64,
    image_width=64,
    mesh_bands=8,
    mesh_sectors=12,
    camera_textures_per_frame=2,
)
TRAINING = TrainConfig(z_dim=4, tex_size=32, iters=3, batch=2)


def test_the_same_settings_reuse_the_avatar_and_its_record(tmp_path):
    first = make_synthetic_avatar(tmp_path / "avatar", CAPTURE, TRAINING)
    again = make_synthetic_avatar(tmp_path / "avatar", CAPTURE, TRAINING)
    assert (first.reused, again.reused) == (False, True)
    assert again.record == first.record
    assert again.record.training.iterations == 3


def test_a_synth_json_that_is_not_a_record_makes_the_avatar_again(tmp_path):
    first = make_synthetic_avatar(tmp_path / "avatar", CAPTURE, TRAINING)
    (first.root / RECORD_FILE).write_text('{"settings": "not a record"}\n')
    again = make_synthetic_avatar(tmp_path / "avatar", CAPTURE, TRAINING)
    assert not again.reused
    assert again.record.settings == first.record.settings
