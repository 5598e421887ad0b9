"""Comparing two runners on the same ordered inputs: errors, PSNR, temporal metrics."""

import math

import numpy as np
import pytest

from avatarq.bench.metrics import Tolerances
from avatarq.engines import RunOptions, build_engine, open_runner
from avatarq.engines.compare import compare_bundle, compare_runners, smooth_sequence
from avatarq.errors import AvatarqError
from tiny_dam import export_tiny_dam


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle with an ORT engine, checkpoint) of a random base DAM, z 16, texture 64."""
    root = tmp_path_factory.mktemp("tiny")
    export_tiny_dam(root, "dam.avq")
    build_engine(root / "dam.avq", "onnxruntime")
    return root / "dam.avq", root / "dam.pt"


def test_smooth_sequence_is_seeded_float32_and_moves_in_small_steps():
    z, view = smooth_sequence(16, 20, seed=3)
    z2, _ = smooth_sequence(16, 20, seed=3)
    assert z.dtype == view.dtype == np.float32 and z.shape == (20, 16) and view.shape == (20, 3)
    assert np.array_equal(z, z2)
    assert np.allclose(np.linalg.norm(view, axis=1), 1.0, atol=1e-6)
    step = np.linalg.norm(np.diff(z, axis=0), axis=1).max()
    assert step < 0.5 * np.linalg.norm(z, axis=1).mean()


def test_a_runner_against_itself_has_no_error_and_no_jitter(tiny):
    z, view = smooth_sequence(16, 6)
    with open_runner(tiny[0], "onnx") as a, open_runner(tiny[0], "onnx") as b:
        result = compare_runners(a, b, z, view)
    assert result.texture_max_abs_error == 0.0 and result.vertices_max_abs_error == 0.0
    assert math.isinf(result.texture.psnr_mean)
    assert result.texture.jitter_ratio == 0.0 and result.texture.tde == 0.0
    assert bool(result)


def test_torch_reference_against_the_onnxruntime_engine(tiny):
    z, view = smooth_sequence(16, 8)
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu")
    with (
        open_runner(tiny[0], "torch", torch_options) as ref,
        open_runner(tiny[0], "onnxruntime") as cand,
    ):
        result = compare_runners(ref, cand, z, view, tolerances=Tolerances(min_psnr=100.0))
    assert result.n_frames == 8
    assert result.texture.psnr_mean > 100.0 and result
    assert result.texture_max_abs_error < 1e-5
    assert result.reference_latency.n == result.candidate_latency.n == 8


def test_tolerances_decide_the_truth_value(tiny):
    z, view = smooth_sequence(16, 4)
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu", fp16=True)
    with open_runner(tiny[0], "onnx") as ref, open_runner(tiny[0], "torch", torch_options) as cand:
        result = compare_runners(ref, cand, z, view, tolerances=Tolerances(min_psnr=200.0))
    assert not result
    assert result.texture.failures()[0].startswith("psnr_mean")
    assert "FAIL" in result.summary()


def test_batches_give_the_same_metrics_as_single_frames(tiny):
    z, view = smooth_sequence(16, 5)
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu", fp16=True)
    with open_runner(tiny[0], "onnx") as ref, open_runner(tiny[0], "torch", torch_options) as cand:
        single = compare_runners(ref, cand, z, view, batch=1)
        batched = compare_runners(ref, cand, z, view, batch=2)
    assert batched.texture.psnr_mean == pytest.approx(single.texture.psnr_mean, rel=1e-9)
    assert batched.texture.jitter_ratio == pytest.approx(single.texture.jitter_ratio, rel=1e-9)


def test_compare_bundle_defaults_to_model_onnx_against_the_best_engine(tiny):
    result = compare_bundle(tiny[0], n_frames=4, compute_ssim=False)
    assert result.extra["backends"] == {"reference": "onnx", "candidate": "onnxruntime"}
    data = result.to_dict()
    assert data["n_frames"] == 4 and data["passed"] is True
    assert data["texture"]["ssim_mean"] is None


def test_compare_bundle_reads_a_latent_sequence(tiny, tmp_path):
    from avatarq.data.latents import LatentSequence

    z, view = smooth_sequence(16, 3, seed=9)
    path = LatentSequence(z, view).save(tmp_path / "seq.npz")
    result = compare_bundle(tiny[0], "onnx", "onnxruntime", latents=path, compute_ssim=False)
    assert result.n_frames == 3


def test_compare_bundle_refuses_latents_of_another_size(tiny, tmp_path):
    from avatarq.data.latents import LatentSequence

    path = LatentSequence(*smooth_sequence(8, 3)).save(tmp_path / "seq.npz")
    with pytest.raises(AvatarqError, match="z of size 8, the bundle's decoder takes 16"):
        compare_bundle(tiny[0], latents=path)


def test_one_frame_is_not_a_sequence(tiny):
    z, view = smooth_sequence(16, 2)
    with open_runner(tiny[0], "onnx") as a, pytest.raises(AvatarqError, match=">= 2 frames"):
        compare_runners(a, a, z[:1], view[:1])
