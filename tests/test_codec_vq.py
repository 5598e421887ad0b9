"""The latent-stream codebook: k-means residual product VQ, its bitstream and its file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from avatarq.codec import (
    Codebook,
    VQConfig,
    load_codebook,
    pack_codes,
    train_codebook,
    unpack_codes,
)
from avatarq.errors import AvatarqError


def smooth_latents(n: int = 200, z_dim: int = 8, seed: int = 0) -> np.ndarray:
    """float32 [n, z_dim]: a smooth random walk, like a capture's encoder means."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, z_dim)) * 0.3
    return np.cumsum(steps, axis=0).astype(np.float32)


@pytest.fixture(scope="module")
def book() -> Codebook:
    return train_codebook(smooth_latents(), VQConfig(codebook_size=16, stages=4, groups=2))


def test_bits_per_frame_is_groups_times_stages_times_code_bits(book):
    assert book.bits_per_frame == 2 * 4 * 4
    assert book.bytes_per_frame == 4
    small = train_codebook(smooth_latents(), VQConfig(codebook_size=5, stages=1, groups=1))
    assert small.bits_per_frame == 3  # ceil(log2 5)


def test_training_error_falls_with_every_stage(book):
    mse = book.train_mse
    assert len(mse) == 4
    assert all(b <= a for a, b in zip(mse, mse[1:], strict=False))
    assert mse[-1] < mse[0] / 4


def test_stages_after_the_first_hold_the_zero_vector(book):
    assert np.all(book.centroids[:, 1:, 0] == 0)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (5, 8), elements=st.floats(-50, 50, width=32)))
def test_every_stage_leaves_every_frame_no_worse(book, z):
    codes = book.encode(z)
    errors = [
        np.sum((z.astype(np.float64) - book.decode(codes, s, np.float64)) ** 2, axis=1)
        for s in range(1, book.stages + 1)
    ]
    for before, after in zip(errors, errors[1:], strict=False):
        assert np.all(after <= before)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_codes_round_trip_through_the_bitstream(book, data):
    b = data.draw(st.integers(0, 6))
    codes = data.draw(arrays(np.uint16, (b, 2, 4), elements=st.integers(0, 15)))
    payload = pack_codes(codes, book)
    assert len(payload) == b * book.bytes_per_frame
    np.testing.assert_array_equal(unpack_codes(payload, book), codes)


def test_a_centroid_of_a_single_stage_codebook_encodes_to_itself():
    one = train_codebook(smooth_latents(), VQConfig(codebook_size=32, stages=1))
    table = one.centroids[0, 0]
    codes = one.encode(table)
    np.testing.assert_array_equal(codes[:, 0, 0], np.arange(32))
    np.testing.assert_array_equal(one.decode(codes), table)


def test_training_is_deterministic_with_a_seed_and_changes_with_another():
    z = smooth_latents()
    config = VQConfig(codebook_size=16, stages=2, seed=3)
    a, b = train_codebook(z, config), train_codebook(z, config)
    assert a.centroids.tobytes() == b.centroids.tobytes()
    c = train_codebook(z, VQConfig(codebook_size=16, stages=2, seed=4))
    assert c.centroids.tobytes() != a.centroids.tobytes()


def test_one_group_per_dimension_is_a_scalar_quantizer_per_dimension():
    z = smooth_latents(z_dim=4)
    scalar = train_codebook(z, VQConfig(codebook_size=4, groups=4))
    assert scalar.group_dims == 1
    assert scalar.bits_per_frame == 8
    q = scalar.quantize(z)
    for dim in range(4):
        assert set(np.unique(q[:, dim])) <= set(scalar.centroids[dim, 0, :, 0])


def test_more_centroids_than_latents_is_refused_naming_the_option():
    with pytest.raises(AvatarqError, match=r"--codebook 256 needs at least 256 .* got 200"):
        train_codebook(smooth_latents(), VQConfig(codebook_size=256))


def test_groups_must_divide_the_latent_size():
    with pytest.raises(AvatarqError, match=r"--groups must divide z's 8 dimensions, got 3"):
        train_codebook(smooth_latents(), VQConfig(codebook_size=4, groups=3))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("codebook_size", 1, r"--codebook \(codebook size\) must be in 2..65536, got 1"),
        ("stages", 0, r"--stages must be in 1..16, got 0"),
        ("groups", 0, r"--groups must be >= 1, got 0"),
    ],
)
def test_config_bounds_name_the_option(field, value, message):
    with pytest.raises(AvatarqError, match=message):
        VQConfig(**{field: value})


def test_codes_out_of_range_are_refused(book):
    with pytest.raises(AvatarqError, match=r"codes must be in 0..15, got 0..16"):
        book.decode(np.full((1, 2, 4), 16, np.uint16) * np.array([0, 1])[None, :, None])


def test_z_of_another_size_is_refused(book):
    with pytest.raises(AvatarqError, match=r"z must be \[B, 8\] for this codebook, got \[2, 6\]"):
        book.encode(np.zeros((2, 6), np.float32))


def test_a_saved_codebook_loads_identical(book, tmp_path):
    path = book.save(tmp_path / "codebook.npz")
    loaded = load_codebook(path)
    assert loaded.centroids.tobytes() == book.centroids.tobytes()
    assert loaded.train_mse == book.train_mse
    assert (loaded.frames, loaded.seed, loaded.source) == (book.frames, book.seed, book.source)


def test_a_codebook_whose_later_stage_lost_its_zero_vector_is_refused(book, tmp_path):
    centroids = book.centroids.copy()
    centroids[0, 1, 0] = 1.0
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        format=np.asarray("avatarq-codebook"),
        version=np.asarray(1),
        centroids=centroids,
        train_mse=np.asarray(book.train_mse),
        frames=np.asarray(200),
        seed=np.asarray(0),
        source=np.asarray(""),
    )
    with pytest.raises(AvatarqError, match=r"bad.npz: codebook stages after the first must hold"):
        load_codebook(path)


def test_a_file_that_is_not_a_codebook_is_one_line(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, z=np.zeros((2, 3)))
    with pytest.raises(AvatarqError, match=r"other.npz is not an avatarq codebook"):
        load_codebook(path)
