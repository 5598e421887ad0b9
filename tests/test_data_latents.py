"""Latent files (.npz) <-> DecoderInputs: round trip and one-line errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from avatarq.core.inputs import DecoderInputs
from avatarq.data.latents import has_labels, load_inputs, save_inputs
from avatarq.errors import AvatarqError


def _inputs(t: int = 5, z: int = 8, labels: bool = True) -> DecoderInputs:
    rng = np.random.default_rng(0)
    view = rng.normal(size=(t, 3))
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    ids = ()
    if labels:
        cams = ["400002", "400004"] * (t // 2) + ["400002"] * (t % 2)
        ids = tuple(("E001_Neutral", f"{100 + 3 * i:06d}", cams[i]) for i in range(t))
    return DecoderInputs.from_z_view(rng.normal(size=(t, z)), view, ids=ids)


def test_round_trip_keeps_arrays_and_labels(tmp_path):
    inputs = _inputs()
    back = load_inputs(save_inputs(inputs, tmp_path / "seq.npz"))
    assert back.z.dtype == np.float32 and back.z.shape == (5, 8)
    np.testing.assert_array_equal(back.z, inputs.z)
    np.testing.assert_array_equal(back.view, inputs.view)
    assert [i[1] for i in back.ids] == ["000100", "000103", "000106", "000109", "000112"]
    assert [i[2] for i in back.ids] == ["400002", "400004", "400002", "400004", "400002"]
    assert [i[0] for i in back.ids] == ["E001_Neutral"] * 5
    assert len(back) == 5 and back.z_dim == 8 and has_labels(back)


def test_a_file_is_one_ordered_clip(tmp_path):
    back = load_inputs(save_inputs(_inputs(), tmp_path / "seq.npz"))
    assert back.clips == ((0, 1, 2, 3, 4),)


def test_round_trip_without_labels_numbers_the_frames(tmp_path):
    back = load_inputs(save_inputs(_inputs(labels=False), tmp_path / "seq.npz"))
    assert back.ids == tuple(("", str(t), "") for t in range(5))
    assert not has_labels(back)


def test_other_named_inputs_round_trip(tmp_path):
    inputs = DecoderInputs({"code": np.ones((3, 4, 8, 8)), "pose": np.zeros((3, 6))})
    back = load_inputs(save_inputs(inputs, tmp_path / "seq.npz"))
    assert sorted(back.arrays) == ["code", "pose"]
    assert back["code"].shape == (3, 4, 8, 8)


def test_save_appends_npz_suffix(tmp_path):
    assert save_inputs(_inputs(), tmp_path / "seq").name == "seq.npz"


def test_inputs_are_stored_as_float32():
    inputs = DecoderInputs.from_z_view(np.zeros((2, 4), np.float64), np.ones((2, 3), np.int64))
    assert inputs.z.dtype == np.float32 and inputs.view.dtype == np.float32


@pytest.mark.parametrize(
    "z, view, match",
    [
        (np.zeros(4), np.zeros((4, 3)), r"input z must be \[T, Z\]"),
        (np.zeros((0, 4)), np.zeros((0, 3)), r"input z must be \[T, \.\.\.\] with T > 0"),
        (np.zeros((4, 2)), np.zeros((3, 3)), "input view has 3 steps, the others have 4"),
        (np.zeros((4, 2)), np.zeros((4, 2)), r"input view must be \[T, 3\]"),
        (np.full((2, 2), np.nan), np.zeros((2, 3)), "input z holds NaN or infinite"),
        (np.zeros((2, 2)), np.full((2, 3), np.inf), "input view holds NaN or infinite"),
        (np.array([["a", "b"]]), np.zeros((1, 3)), "input z must hold real numbers"),
    ],
)
def test_bad_arrays_are_rejected(z, view, match):
    with pytest.raises(AvatarqError, match=match):
        DecoderInputs.from_z_view(z, view)


def test_label_length_must_match(tmp_path):
    np.savez(
        tmp_path / "seq.npz", z=np.zeros((2, 2)), view=np.zeros((2, 3)), frame=np.array(["1"] * 3)
    )
    with pytest.raises(AvatarqError, match=r"label frame must be \[T\] = \[2\], got \[3\]"):
        load_inputs(tmp_path / "seq.npz")


def test_load_missing_file(tmp_path):
    with pytest.raises(AvatarqError, match="latent file not found"):
        load_inputs(tmp_path / "nope.npz")


def test_load_a_folder(tmp_path):
    with pytest.raises(AvatarqError, match="is not a file"):
        load_inputs(tmp_path)


def test_load_a_file_that_is_not_npz(tmp_path):
    (tmp_path / "seq.npz").write_text("z,view\n1,2\n")
    with pytest.raises(AvatarqError, match="is not a readable .npz"):
        load_inputs(tmp_path / "seq.npz")


def test_load_a_single_npy_array(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((2, 2)))
    with pytest.raises(AvatarqError, match="single .npy array"):
        load_inputs(tmp_path / "z.npy")


def test_load_missing_key_names_it(tmp_path):
    np.savez(tmp_path / "seq.npz", z=np.zeros((2, 4)))
    with pytest.raises(AvatarqError, match="is missing view"):
        load_inputs(tmp_path / "seq.npz")


def test_load_wrong_shape_names_the_file(tmp_path):
    np.savez(tmp_path / "seq.npz", z=np.zeros((2, 4)), view=np.zeros((2, 4)))
    with pytest.raises(AvatarqError, match=r"seq.npz: input view must be \[T, 3\]"):
        load_inputs(tmp_path / "seq.npz")


def test_saving_is_atomic_and_leaves_no_temporary_file(tmp_path):
    save_inputs(_inputs(), tmp_path / "seq.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.npz"]
