"""`avatarq compare`'s library call and the comparator on real runners of a bundle."""

import math

import numpy as np
import pytest

from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.data.latents import save_inputs
from avatarq.engines import RunOptions, build_engine, open_runner
from avatarq.engines.compare import compare_bundle
from avatarq.errors import AvatarqError
from avatarq.measure import Tolerances, compare
from tiny_dam import export_tiny_dam


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle with an ORT engine, checkpoint) of a random base DAM, z 16, texture 64."""
    root = tmp_path_factory.mktemp("tiny")
    export_tiny_dam(root, "dam.avq")
    build_engine(root / "dam.avq", "onnxruntime")
    return root / "dam.avq", root / "dam.pt"


def test_a_runner_against_itself_has_no_error_and_no_jitter(tiny):
    with open_runner(tiny[0], "onnx") as a, open_runner(tiny[0], "onnx") as b:
        result = compare(a, b, smooth_clip(16, 6))
    assert result.texture_max_abs_error == 0.0 and result.vertices_max_abs_error == 0.0
    assert math.isinf(result.texture.psnr_mean)
    assert result.texture.jitter_ratio == 0.0 and result.texture.tde == 0.0
    assert bool(result)


def test_torch_reference_against_the_onnxruntime_engine(tiny):
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu")
    with (
        open_runner(tiny[0], "torch", torch_options) as ref,
        open_runner(tiny[0], "onnxruntime") as cand,
    ):
        result = compare(ref, cand, smooth_clip(16, 8), Tolerances(min_psnr=100.0))
    assert result.n_frames == 8
    assert result.texture.psnr_mean > 100.0 and result
    assert result.texture_max_abs_error < 1e-5
    assert result.reference_latency.n == result.candidate_latency.n == 8


def test_tolerances_decide_the_truth_value(tiny):
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu", fp16=True)
    with open_runner(tiny[0], "onnx") as ref, open_runner(tiny[0], "torch", torch_options) as cand:
        result = compare(ref, cand, smooth_clip(16, 4), Tolerances(min_psnr=200.0))
    assert not result
    assert result.texture.failures()[0].startswith("psnr_mean")
    assert "FAIL" in result.summary()


def test_batches_give_the_same_metrics_as_single_frames(tiny):
    torch_options = RunOptions(checkpoint=str(tiny[1]), device="cpu", fp16=True)
    clip = smooth_clip(16, 5)
    with open_runner(tiny[0], "onnx") as ref, open_runner(tiny[0], "torch", torch_options) as cand:
        single = compare(ref, cand, clip, batch=1)
        batched = compare(ref, cand, clip, batch=2)
    assert batched.texture.psnr_mean == pytest.approx(single.texture.psnr_mean, rel=1e-9)
    assert batched.texture.jitter_ratio == pytest.approx(single.texture.jitter_ratio, rel=1e-9)


def test_compare_bundle_defaults_to_model_onnx_against_the_best_engine(tiny):
    result = compare_bundle(tiny[0], n_frames=4, compute_ssim=False)
    assert result.extra["backends"] == {"reference": "onnx", "candidate": "onnxruntime"}
    data = result.to_dict()
    assert data["n_frames"] == 4 and data["passed"] is True
    assert data["texture"]["ssim_mean"] is None


def test_compare_bundle_prints_each_latency_next_to_its_runner(tiny):
    summary = compare_bundle(tiny[0], n_frames=4, compute_ssim=False).summary()
    assert "ms (onnxruntime:onnxruntime-cpu.onnx) vs " in summary
    assert summary.endswith("ms (onnx:model.onnx). PASS")


def test_compare_bundle_reads_a_latent_file(tiny, tmp_path):
    path = save_inputs(smooth_clip(16, 3, seed=9), tmp_path / "seq.npz")
    result = compare_bundle(tiny[0], "onnx", "onnxruntime", latents=path, compute_ssim=False)
    assert result.n_frames == 3


def test_compare_bundle_refuses_latents_of_another_size(tiny, tmp_path):
    path = save_inputs(smooth_clip(8, 3), tmp_path / "seq.npz")
    with pytest.raises(AvatarqError, match="z of size 8, the bundle's decoder takes 16"):
        compare_bundle(tiny[0], latents=path)


def test_one_frame_is_not_a_sequence(tiny):
    one = DecoderInputs.from_z_view(np.zeros((1, 16)), np.array([[0.0, 0.0, 1.0]]))
    with open_runner(tiny[0], "onnx") as a, pytest.raises(AvatarqError, match="at least 2 frames"):
        compare(a, a, one)
