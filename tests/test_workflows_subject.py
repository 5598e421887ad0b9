"""The test subject: a synthetic avatar, its training record and its held-out clip.

Built here at a tiny size (the full-size one is `SubjectConfig()`, made by
benchmarks/test_subject.py); the behaviours are the same.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from avatarq.data.capture import MultifaceCapture
from avatarq.data.synthetic_capture import SyntheticCaptureConfig
from avatarq.data.train import TrainConfig
from avatarq.errors import AvatarqError
from avatarq.workflows.subject import (
    SUBJECT_PREFIX,
    SubjectConfig,
    TestSubject,
    make_test_subject,
    training_status,
)

TINY = SubjectConfig(
    capture=SyntheticCaptureConfig(
        texture_size=64,
        n_cameras=2,
        segment_frames=(4, 4),
        mesh_bands=16,
        mesh_sectors=24,
        detail="fine",
    ),
    train=TrainConfig(z_dim=8, tex_size=32, iters=6, batch=2),
    heldout_frames=5,
)


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> TestSubject:
    return make_test_subject(tmp_path_factory.mktemp("subjects"), TINY)


def test_the_subject_is_cached_under_a_key_of_its_settings(subject):
    assert subject.root.name == SUBJECT_PREFIX + TINY.key()
    assert len(TINY.key()) == 12
    longer = SubjectConfig(capture=TINY.capture, train=TrainConfig(z_dim=8, tex_size=32, iters=7))
    assert longer.key() != TINY.key()


def test_a_second_call_reuses_the_cached_subject(subject):
    again = make_test_subject(subject.root.parent, TINY)
    assert again.reused and not subject.reused
    assert again.record == subject.record
    assert again.checkpoint == subject.checkpoint


def test_the_record_reports_training_loss_against_predicting_the_mean_texture(subject):
    training = subject.record["training"]
    assert training["steps"] == 6
    assert training["mean_texture_loss"] > 0
    ratio = training["final_texture_loss"] / training["mean_texture_loss"]
    assert training["texture_loss_ratio"] == pytest.approx(ratio)
    assert [c["steps"] for c in training["curve"]] == [[i, i] for i in range(1, 7)]


def test_the_record_reports_the_texture_loss_on_the_held_out_clip(subject):
    heldout = subject.record["heldout"]
    assert heldout["frames"] == 5
    assert heldout["samples"] == 5  # one camera texture per held-out frame
    assert heldout["texture_loss"] > 0
    assert heldout["training_mean_texture_loss"] > 0


def test_the_held_out_capture_shares_the_cameras_but_not_the_motion(subject):
    train, held = MultifaceCapture(subject.capture_root), MultifaceCapture(subject.heldout_root)
    assert (subject.capture_root / "KRT").read_bytes() == (
        subject.heldout_root / "KRT"
    ).read_bytes()
    seg, frames = next(held.clips())
    tseg, tframes = next(train.clips())
    assert seg == tseg and frames[:4] == tframes  # same names, other content
    assert not np.allclose(held.vertices(seg, frames[1]), train.vertices(tseg, tframes[1]))


def test_the_held_out_sequence_is_encoded_from_frames_no_calibration_sample_comes_from(subject):
    seq = subject.heldout_sequence()
    assert len(seq) == 5
    assert seq.z.shape == (5, 8) and seq.z.dtype == np.float32
    assert seq.M.shape == (5, 3, 4)
    assert all(i.startswith("heldout:E001_Jaw_Open_Brow_Raise/") for i in seq.ids)
    assert seq.capture_root == subject.capture_root  # de-normalized like the training data
    train = MultifaceCapture(subject.capture_root)
    from avatarq.data.encode import encode_frames
    from avatarq.models.checkpoint import load_checkpoint

    seen = encode_frames(load_checkpoint(subject.checkpoint), train, train.frames).numpy()
    distance = np.linalg.norm(seq.z[:, None] - seen[None], axis=-1)
    assert distance.min() > 0  # no held-out code is a training frame's code


def test_the_held_out_sequence_can_be_shortened(subject):
    assert len(subject.heldout_sequence(max_frames=3)) == 3


def test_a_held_out_clip_must_move_differently():
    with pytest.raises(AvatarqError, match="heldout_motion_seed 1 is the training capture's"):
        SubjectConfig(capture=SyntheticCaptureConfig(motion_seed=1), heldout_motion_seed=1)


def test_the_default_subject_is_full_size_with_fine_detail():
    config = SubjectConfig()
    assert (config.train.tex_size, config.train.z_dim) == (1024, 256)
    assert config.capture.texture_size == 1024 and config.capture.detail == "fine"


@pytest.mark.slow
def test_the_peer_study_evaluates_on_the_held_out_clip(subject, tmp_path):
    from avatarq.calibration.config import CalibrationConfig
    from avatarq.workflows.peers import PeerMethod, compare_calibrations

    clip = subject.heldout_sequence()
    study = compare_calibrations(
        subject.checkpoint,
        subject.capture_root,
        tmp_path,
        [PeerMethod("avatarq max", CalibrationConfig(method="max"))],
        n_random=4,
        max_frames=4,
        threads=1,
        clip=clip,
    )
    assert study.setup["clip"] == {"source": clip.source, "frames": 4}
    (row,) = study.rows
    assert 20 < row.psnr < math.inf


def test_the_training_status_of_a_finished_subject_is_its_record(subject):
    status = training_status(subject.root.parent, TINY)
    assert status["finished"] and status["steps"] == status["iters"] == 6
    assert status["mean_texture_loss"] == subject.record["training"]["mean_texture_loss"]


def test_the_training_status_of_an_unstarted_subject_is_an_error(tmp_path):
    with pytest.raises(AvatarqError, match="no saved training state"):
        training_status(tmp_path, TINY)
