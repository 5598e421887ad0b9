"""`avatarq bench`'s harness: what it plays, what it measures, when it fails.

The FP32 bundle of the small synthetic avatar is both the reference and the runner under
test; wrapped runners add errors with known temporal statistics.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from avatarq.bench import BenchConfig, BenchSequence, bench_bundle, load_sequence, run_bench
from avatarq.bench.sequences import (
    default_camera,
    parse_capture_spec,
    with_image_size,
)
from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.data import MultifaceCapture, save_inputs
from avatarq.engines import open_runner
from avatarq.errors import AvatarqError
from avatarq.export import open_bundle
from conftest import SMALL_CAPTURE

SEGMENT = "E001_Jaw_Open_Brow_Raise"
# The small capture's cameras are calibrated for 256 x 168 images, but it writes no photos
# from which MultifaceCapture could read that size.
CAMERA_IMAGE = (SMALL_CAPTURE.image_height, SMALL_CAPTURE.image_width)
FAST = dict(resolution=(64, 42), warmup=1, iters=2, compute_ssim=False)


class OffsetRunner:
    """Wraps a runner and adds offset(t) (0..255 texture units) to every texel of frame t,
    where t counts frames decoded so far: a deployed model with a known error."""

    def __init__(self, inner, offset, name="offset"):
        self.inner, self.offset, self.name, self.t = inner, offset, name, 0

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def decode(self, z, view):
        tex, vert = self.inner.decode(z, view)
        out = np.empty_like(tex)
        for i in range(tex.shape[0]):
            out[i] = tex[i] + np.float32(self.offset(self.t))
            self.t += 1
        return out, vert.copy()


@pytest.fixture(scope="module")
def bundle(small_bundle):
    return open_bundle(small_bundle)


@pytest.fixture(scope="module")
def clip(small_avatar, bundle) -> BenchSequence:
    """The first segment (6 frames), encoded by the checkpoint, seen by the frontal camera."""
    spec = f"{small_avatar.capture_root}:{SEGMENT}"
    seq = load_sequence(spec, bundle.manifest.z_dim, small_avatar.checkpoint)
    return with_image_size(seq, CAMERA_IMAGE)


@pytest.fixture(scope="module")
def self_result(bundle, clip):
    """FP32 model.onnx against itself, rendered, with SSIM and passing gates."""
    config = BenchConfig(
        runners=("onnx",),
        render="torch",
        resolution=(64, 42),
        warmup=1,
        iters=3,
        gates=("psnr>=40", "J<=0.1", "p99_ms<=100000"),
    )
    return run_bench(bundle, clip, config)


def _known_error_result(bundle, clip, offset):
    runner = OffsetRunner(open_runner(bundle, "onnx"), offset)
    return run_bench(bundle, clip, BenchConfig(**FAST), runners=[runner])


# --------------------------------------------------------------------------- sequences


def test_a_capture_segment_plays_every_frame_in_order_through_the_frontal_camera(
    small_avatar, clip
):
    capture = MultifaceCapture(small_avatar.capture_root)
    frames = next(capture.clips(SEGMENT))[1]
    assert clip.ids == tuple(f"{SEGMENT}/{f}/400004" for f in frames)
    assert clip.M.shape == (6, 3, 4)
    np.testing.assert_array_equal(clip.M[2], capture.projection(SEGMENT, frames[2], "400004"))
    np.testing.assert_array_equal(
        clip.view[0], capture.view_direction(SEGMENT, frames[0], "400004")
    )


def test_the_default_camera_is_the_middle_one_of_the_arc(small_avatar):
    # cameras at azimuth -50, 0, +50 degrees: the middle one looks at the face
    assert default_camera(MultifaceCapture(small_avatar.capture_root)) == "400004"


def test_the_default_camera_is_the_folded_colour_correction_camera_when_there_is_one(
    small_avatar,
):
    assert default_camera(MultifaceCapture(small_avatar.capture_root), camera_index=2) == "400006"


def test_a_capture_spec_may_name_the_camera(small_avatar):
    root = small_avatar.capture_root
    assert parse_capture_spec(f"{root}:{SEGMENT}:400002") == (root, SEGMENT, "400002")
    assert parse_capture_spec(f"{root}:{SEGMENT}") == (root, SEGMENT, None)


def test_a_latent_file_with_frame_labels_takes_each_frames_camera_from_the_capture(
    small_avatar, clip, tmp_path
):
    path = save_inputs(clip.inputs, tmp_path / "clip.npz")
    seq = load_sequence(path, clip.z_dim, capture=small_avatar.capture_root)
    np.testing.assert_array_equal(seq.M, clip.M)
    np.testing.assert_array_equal(seq.z, clip.z)


def test_a_latent_file_without_a_capture_has_no_camera(clip, tmp_path):
    path = save_inputs(DecoderInputs.from_z_view(clip.z, clip.view), tmp_path / "clip.npz")
    seq = load_sequence(path, clip.z_dim)
    assert seq.M is None
    assert seq.ids == tuple(str(i) for i in range(6))


def test_the_default_clip_without_a_capture_is_a_smooth_unit_variance_trajectory():
    clip = smooth_clip(64, n_frames=300)
    z, view = clip.z, clip.view
    assert z.shape == (300, 64) and view.shape == (300, 3)
    assert abs(float(z.std()) - 1.0) < 0.15
    # smooth in time: consecutive frames correlate (shuffled frames would give ~0)
    lag1 = float((z[1:] * z[:-1]).mean() / (z * z).mean())
    assert lag1 > 0.95
    np.testing.assert_array_equal(smooth_clip(64, n_frames=300).z, z)  # seeded


# --------------------------------------------------------------------------- measurements


def test_fp32_against_itself_has_zero_temporal_error_in_both_spaces(self_result):
    (onnx,) = self_result.runners
    for comparison in (onnx.texture, onnx.screen):
        assert comparison.tde == 0.0
        assert comparison.flicker_excess == 0.0
        assert comparison.jitter_ratio == 0.0
        assert comparison.psnr_min == math.inf
        assert comparison.ssim_mean == 1.0
        assert comparison.n_frames == 6


def test_screen_space_means_are_restricted_to_the_fp32_foreground(self_result):
    assert self_result.runners[0].screen.masked
    assert not self_result.runners[0].texture.masked
    assert self_result.render["resolution"] == [64, 42]
    assert self_result.render["backend"] == "torch"


def test_latency_is_reported_per_stage_for_the_reference_and_each_runner(self_result):
    for r in (self_result.reference, *self_result.runners):
        assert set(r.latency) == {"decode", "copy", "render", "end_to_end"}
        assert all(s.n == 3 and s.batch == 1 for s in r.latency.values())
        e2e = r.latency["end_to_end"]
        assert e2e.p50_ms <= e2e.p90_ms <= e2e.p99_ms
        assert e2e.mean_ms >= r.latency["render"].mean_ms


def test_interleaved_timing_gives_every_runner_the_same_number_of_samples(bundle, clip):
    config = BenchConfig(runners=("onnx",), render="none", warmup=0, iters=4, interleave=True)
    result = run_bench(bundle, clip, config)
    for r in (result.reference, *result.runners):
        assert {s: v.n for s, v in r.latency.items()} == {"decode": 4, "end_to_end": 4}


def test_passing_gates_give_exit_code_0(self_result):
    assert self_result.passed and self_result.exit_code == 0
    assert [str(g.gate) for g in self_result.runners[0].gates] == [
        "psnr>=40",
        "jitter_ratio<=0.1",
        "p99_ms<=100000",
    ]


def test_a_constant_error_has_jitter_ratio_0_and_no_tde(bundle, clip):
    result = _known_error_result(bundle, clip, lambda t: 2.0)
    texture = result.runners[0].texture
    # e_t = 2/255 on every texel of every frame, up to float32 rounding of F + 2
    assert texture.jitter_ratio == pytest.approx(0.0, abs=1e-5)
    assert texture.tde == pytest.approx(0.0, abs=1e-7)
    assert texture.psnr_mean == pytest.approx(20 * math.log10(255 / 2), abs=1e-3)
    assert result.runners[0].screen.jitter_ratio == pytest.approx(0.0, abs=1e-3)


def test_an_error_flipping_sign_every_frame_has_jitter_ratio_2(bundle, clip):
    result = _known_error_result(bundle, clip, lambda t: 2.0 if t % 2 == 0 else -2.0)
    texture = result.runners[0].texture
    assert texture.jitter_ratio == pytest.approx(2.0, abs=1e-5)
    assert texture.tde == pytest.approx(4 / 255, rel=1e-5)  # |e_t - e_(t-1)| = 4/255


def test_a_failing_gate_gives_exit_code_1_and_names_the_gate(bundle, clip):
    runner = OffsetRunner(open_runner(bundle, "onnx"), lambda t: 2.0 * (-1) ** t, "flicker")
    config = BenchConfig(**FAST, gates="psnr>=30,J<=1")
    result = run_bench(bundle, clip, config, runners=[runner])
    assert not result and result.exit_code == 1
    assert result.failures() == ["flicker: jitter_ratio<=1: 2 FAIL"]
    assert result.verdict().startswith("FAIL: 1 of 2 gate checks failed")


def test_screen_space_gates_read_the_rendered_metrics(bundle, clip):
    runner = OffsetRunner(open_runner(bundle, "onnx"), lambda t: 2.0)
    config = BenchConfig(**FAST, gates="psnr>=100", gate_space="screen")
    result = run_bench(bundle, clip, config, runners=[runner])
    (gate,) = result.runners[0].gates
    assert gate.value == result.runners[0].screen.psnr_mean


def test_a_sequence_without_a_camera_is_measured_in_texture_space_only(bundle, clip):
    seq = BenchSequence.of(clip.z, clip.view, None, clip.inputs.ids, "no camera")
    result = run_bench(bundle, seq, BenchConfig(runners=("onnx",), warmup=0, iters=2))
    (onnx,) = result.runners
    assert onnx.screen is None and onnx.texture.tde == 0.0
    assert set(onnx.latency) == {"decode", "end_to_end"}
    assert result.render == {
        "backend": None,
        "note": "the sequence has no camera (no capture given)",
    }


def test_the_torch_decoder_is_the_reference_when_the_checkpoint_is_given(
    small_avatar, bundle, clip
):
    config = BenchConfig(runners=("onnx",), render="none", warmup=0, iters=1)
    result = run_bench(bundle, clip, config, checkpoint=small_avatar.checkpoint)
    assert result.reference.label == "FP32 PyTorch decoder of dam.pt (torch fp32 cpu)"
    assert result.runners[0].texture.psnr_min > 100  # ORT FP32 vs torch FP32: rounding only


def test_bench_bundle_runs_the_default_clip_and_writes_the_report(
    small_avatar, small_bundle, tmp_path
):
    result, paths = bench_bundle(
        small_bundle,
        config=BenchConfig(runners=("onnx",), render="none", warmup=0, iters=1),
        out=tmp_path / "report",
    )
    assert result.sequence["n_frames"] == 32
    assert result.sequence["has_camera"] is False
    assert paths["json"].is_file() and paths["html"].is_file()


def test_default_runners_are_model_onnx_plus_the_engines_built_into_the_bundle(bundle):
    from avatarq.bench import default_runners

    assert default_runners(bundle) == (["onnx"], {})


def _with_missing_engine(bundle, tmp_path):
    """A copy of the bundle whose manifest lists an onnxruntime engine file that is gone."""
    from avatarq.engines import build_engine

    copy = tmp_path / "engine.avq"
    shutil.copytree(bundle.root, copy)
    for old in (copy / "engines").glob("*"):
        old.unlink()
    record = build_engine(copy, "onnxruntime")
    (copy / record.path).unlink()
    return copy


def test_a_default_runner_that_cannot_open_is_skipped_with_the_reason(bundle, clip, tmp_path):
    copy = _with_missing_engine(bundle, tmp_path)
    result = run_bench(copy, clip, BenchConfig(render="none", warmup=0, iters=1))
    assert [r.name for r in result.runners] == ["onnx"]
    assert "engines/onnxruntime-cpu.onnx" in result.skipped["onnxruntime"]
    assert "is missing" in result.skipped["onnxruntime"]


# --------------------------------------------------------------------------- bad input


def test_a_named_runner_that_cannot_open_is_a_one_line_error(bundle, clip, tmp_path):
    copy = _with_missing_engine(bundle, tmp_path)
    config = BenchConfig(runners=("onnxruntime",), render="none")
    with pytest.raises(AvatarqError, match="engine file engines/onnxruntime-cpu.onnx .* missing"):
        run_bench(copy, clip, config)


def test_rendering_a_bundle_without_topology_is_a_one_line_error(small_avatar, bundle, tmp_path):
    bare = tmp_path / "bare.avq"
    shutil.copytree(bundle.root, bare)
    (bare / "topology.npz").unlink()
    with pytest.raises(AvatarqError, match=r"has no topology\.npz") as info:
        bench_bundle(bare, config=BenchConfig(render="torch"), capture=small_avatar.capture_root)
    assert "\n" not in str(info.value)


def test_a_sequence_with_another_latent_size_is_a_one_line_error(bundle, clip, tmp_path):
    wrong = DecoderInputs.from_z_view(np.zeros((4, clip.z_dim + 1)), clip.view[:4])
    path = save_inputs(wrong, tmp_path / "z.npz")
    with pytest.raises(AvatarqError, match=r"latents have size 17 .* decodes z of size 16") as info:
        bench_bundle(bundle.root, sequence=path)
    assert "\n" not in str(info.value)


def test_an_unknown_gate_is_a_one_line_error():
    with pytest.raises(AvatarqError, match=r"unknown gate metric 'wobble'") as info:
        BenchConfig(gates="psnr>=40,wobble<=1")
    assert "\n" not in str(info.value)


def test_an_explicit_renderer_needs_a_camera(bundle, clip):
    seq = BenchSequence.of(clip.z, clip.view, None, clip.inputs.ids, "no camera")
    with pytest.raises(AvatarqError, match="needs a camera"):
        run_bench(bundle, seq, BenchConfig(render="torch", runners=("onnx",)))


def test_a_capture_segment_needs_the_checkpoint(small_avatar, bundle):
    with pytest.raises(AvatarqError, match="--checkpoint"):
        load_sequence(f"{small_avatar.capture_root}:{SEGMENT}", bundle.manifest.z_dim)


def test_a_quantized_bundle_without_checkpoint_has_no_reference(bundle, clip, tmp_path):
    copy = tmp_path / "int8.avq"
    shutil.copytree(bundle.root, copy)
    manifest = (
        (copy / "manifest.json").read_text().replace('"precision": "fp32"', '"precision": "int8"')
    )
    (copy / "manifest.json").write_text(manifest)
    with pytest.raises(AvatarqError, match="cannot be its own FP32 reference"):
        run_bench(copy, clip, BenchConfig(runners=("onnx",), render="none"))


def test_the_config_round_trips_through_a_dict():
    config = BenchConfig(runners=("onnx", "torch"), resolution=(64, 42), gates="J<=0.5,p99_ms<20")
    assert BenchConfig.from_dict(config.to_dict()) == config
    assert config.gates == ("jitter_ratio<=0.5", "p99_ms<20")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nvdiffrast_rendering_agrees_with_the_torch_rasterizer_on_fp32_vs_itself(bundle, clip):
    config = BenchConfig(runners=("onnx",), render="nvdiffrast", warmup=1, iters=3)
    result = run_bench(bundle, clip, config)
    (onnx,) = result.runners
    assert result.render["backend"] == "nvdiffrast" and result.render["device"] == "cuda"
    assert onnx.screen.tde == 0.0 and onnx.screen.flicker_excess == 0.0
    assert onnx.latency["render"].n == 3
