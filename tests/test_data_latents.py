"""Latent-sequence .npz files: round trip and one-line errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from avatarq.data.latents import LatentSequence
from avatarq.errors import AvatarqError


def _sequence(t: int = 5, z: int = 8, labels: bool = True) -> LatentSequence:
    rng = np.random.default_rng(0)
    view = rng.normal(size=(t, 3))
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    extra = {}
    if labels:
        extra = {
            "camera": np.array(["400002", "400004"] * (t // 2) + ["400002"] * (t % 2)),
            "frame": np.array([f"{100 + 3 * i:06d}" for i in range(t)]),
            "segment": np.array(["E001_Neutral"] * t),
        }
    return LatentSequence(rng.normal(size=(t, z)), view, **extra)


def test_round_trip_keeps_arrays_and_labels(tmp_path):
    seq = _sequence()
    path = seq.save(tmp_path / "seq.npz")
    back = LatentSequence.load(path)
    assert back.z.dtype == np.float32 and back.z.shape == (5, 8)
    np.testing.assert_array_equal(back.z, seq.z)
    np.testing.assert_array_equal(back.view, seq.view)
    assert back.frame.tolist() == ["000100", "000103", "000106", "000109", "000112"]
    assert back.camera.tolist() == ["400002", "400004", "400002", "400004", "400002"]
    assert back.segment.tolist() == ["E001_Neutral"] * 5
    assert len(back) == 5 and back.z_dim == 8


def test_round_trip_without_labels(tmp_path):
    back = LatentSequence.load(_sequence(labels=False).save(tmp_path / "seq.npz"))
    assert back.camera is None and back.frame is None and back.segment is None


def test_save_appends_npz_suffix(tmp_path):
    assert _sequence().save(tmp_path / "seq").name == "seq.npz"


def test_inputs_are_stored_as_float32():
    seq = LatentSequence(np.zeros((2, 4), np.float64), np.ones((2, 3), np.int64))
    assert seq.z.dtype == np.float32 and seq.view.dtype == np.float32


@pytest.mark.parametrize(
    "z, view, match",
    [
        (np.zeros(4), np.zeros((4, 3)), r"latent z must be \[T, Z\]"),
        (np.zeros((0, 4)), np.zeros((0, 3)), r"latent z must be \[T, Z\] with T, Z > 0"),
        (
            np.zeros((4, 2)),
            np.zeros((3, 3)),
            r"latent view must be \[T, 3\] = \[4, 3\], got \[3, 3\]",
        ),
        (np.zeros((4, 2)), np.zeros((4, 2)), r"latent view must be \[T, 3\]"),
        (np.full((2, 2), np.nan), np.zeros((2, 3)), "latent z holds NaN or infinite"),
        (np.zeros((2, 2)), np.full((2, 3), np.inf), "latent view holds NaN or infinite"),
        (np.array([["a", "b"]]), np.zeros((1, 3)), "latent z must be real numbers"),
    ],
)
def test_bad_arrays_are_rejected(z, view, match):
    with pytest.raises(AvatarqError, match=match):
        LatentSequence(z, view)


def test_label_length_must_match(tmp_path):
    with pytest.raises(AvatarqError, match=r"latent frame must be \[T\] = \[2\], got \[3\]"):
        LatentSequence(np.zeros((2, 2)), np.zeros((2, 3)), frame=np.array(["1", "2", "3"]))


def test_load_missing_file(tmp_path):
    with pytest.raises(AvatarqError, match="latent-sequence file not found"):
        LatentSequence.load(tmp_path / "nope.npz")


def test_load_a_file_that_is_not_npz(tmp_path):
    (tmp_path / "seq.npz").write_text("z,view\n1,2\n")
    with pytest.raises(AvatarqError, match="not a readable latent-sequence .npz"):
        LatentSequence.load(tmp_path / "seq.npz")


def test_load_a_single_npy_array(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((2, 2)))
    with pytest.raises(AvatarqError, match="single .npy array"):
        LatentSequence.load(tmp_path / "z.npy")


def test_load_missing_key_names_it(tmp_path):
    np.savez(tmp_path / "seq.npz", z=np.zeros((2, 4)))
    with pytest.raises(AvatarqError, match="is missing view"):
        LatentSequence.load(tmp_path / "seq.npz")


def test_load_wrong_shape_names_the_file(tmp_path):
    np.savez(tmp_path / "seq.npz", z=np.zeros((2, 4)), view=np.zeros((2, 4)))
    with pytest.raises(AvatarqError, match=r"seq.npz: latent view must be \[T, 3\]"):
        LatentSequence.load(tmp_path / "seq.npz")
