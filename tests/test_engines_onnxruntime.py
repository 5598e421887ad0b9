"""ONNX Runtime and torch runners on a tiny random DAM bundle; `build_engine` for ORT."""

import json
import shutil

import numpy as np
import pytest

from avatarq.engines import BuildOptions, RunOptions, build_engine, open_runner
from avatarq.errors import AvatarqError
from avatarq.export import ExportOptions, export_bundle, open_bundle
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint
from tiny_dam import export_tiny_dam

Z_DIM = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle dir, checkpoint) of a random base DAM: z 16, texture 64, 30 vertices."""
    root = tmp_path_factory.mktemp("tiny")
    export_tiny_dam(root, "dam.avq")
    return root / "dam.avq", root / "dam.pt"


@pytest.fixture
def bundle(tiny, tmp_path):
    """A fresh copy of the tiny bundle (tests build engines into it)."""
    return shutil.copytree(tiny[0], tmp_path / "dam.avq")


def _inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, Z_DIM)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (batch, 1))
    return z, view


def test_build_records_the_engine_in_the_manifest(bundle):
    record = build_engine(bundle, "onnxruntime")
    manifest = open_bundle(bundle).manifest
    assert [(e.backend, e.path, e.target) for e in manifest.engines] == [
        ("onnxruntime", "engines/onnxruntime-cpu.onnx", "cpu")
    ]
    assert (bundle / record.path).stat().st_size == record.size_bytes
    assert record.library_version == __import__("onnxruntime").__version__
    assert record.build_seconds > 0


def test_build_checks_the_float_rewrite_against_model_onnx(bundle):
    check = build_engine(bundle, "onnxruntime").check
    assert check.texture_max_abs_error <= 1e-6 * check.peak
    assert check.texture_psnr_db > 120


def test_rebuilding_replaces_the_record_of_the_same_target(bundle):
    build_engine(bundle, "onnxruntime")
    build_engine(bundle, "onnxruntime", BuildOptions(ort_rewrite=False))
    engines = open_bundle(bundle).manifest.engines
    assert len(engines) == 1 and engines[0].rewrite is None


def test_engine_runner_matches_model_onnx(bundle):
    build_engine(bundle, "onnxruntime")
    z, view = _inputs(3)
    with open_runner(bundle, "onnx") as reference, open_runner(bundle, "onnxruntime") as engine:
        ref_tex, ref_vert = (a.copy() for a in reference.decode(z, view))
        tex, vert = engine.decode(z, view)
    assert np.abs(tex - ref_tex).max() <= 1e-6 * (ref_tex.max() - ref_tex.min())
    assert np.abs(vert - ref_vert).max() <= 1e-6


def test_onnxruntime_backend_needs_a_built_engine(bundle):
    with pytest.raises(AvatarqError, match="has no onnxruntime engine; build it"):
        open_runner(bundle, "onnxruntime")


def test_missing_engine_file_is_reported(bundle):
    record = build_engine(bundle, "onnxruntime")
    (bundle / record.path).unlink()
    with pytest.raises(AvatarqError, match="is missing; rebuild it"):
        open_runner(bundle, "onnxruntime")


def test_corrupt_engine_file_is_reported(bundle):
    record = build_engine(bundle, "onnxruntime")
    path = bundle / record.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AvatarqError, match="is corrupt"):
        open_runner(bundle, "onnxruntime")


def test_onnx_runner_accepts_every_batch_up_to_max_batch(tiny):
    with open_runner(tiny[0], "onnx", RunOptions(max_batch=3, threads=1)) as runner:
        for batch in (1, 2, 3):
            texture, vertices = runner.decode(*_inputs(batch))
            assert texture.shape == (batch, 3, 64, 64) and vertices.shape == (batch, 30, 3)
        with pytest.raises(AvatarqError, match="batch size must be 1..3"):
            runner.decode(*_inputs(4))


def test_torch_runner_matches_onnx_runtime(tiny):
    z, view = _inputs(2)
    options = RunOptions(checkpoint=str(tiny[1]), device="cpu")
    with (
        open_runner(tiny[0], "onnx") as ort_runner,
        open_runner(tiny[0], "torch", options) as torch_runner,
    ):
        ref_tex, ref_vert = (a.copy() for a in ort_runner.decode(z, view))
        tex, vert = torch_runner.decode(z, view)
    assert np.abs(tex - ref_tex).max() < 1e-5
    assert np.abs(vert - ref_vert).max() < 1e-5


def test_torch_runner_fp16_is_close_to_fp32(tiny):
    z, view = _inputs(2)
    fp32 = RunOptions(checkpoint=str(tiny[1]), device="cpu")
    fp16 = RunOptions(checkpoint=str(tiny[1]), device="cpu", fp16=True)
    with open_runner(tiny[0], "torch", fp32) as a, open_runner(tiny[0], "torch", fp16) as b:
        ref = a.decode(z, view)[0].copy()
        half = b.decode(z, view)[0]
    span = ref.max() - ref.min()
    assert 0 < np.abs(half - ref).max() < 1e-2 * span


def test_torch_runner_needs_the_checkpoint(tiny):
    with pytest.raises(AvatarqError, match="pass the checkpoint the bundle was exported from"):
        open_runner(tiny[0], "torch")


def test_torch_runner_refuses_another_checkpoint(tiny, tmp_path):
    other = DeepAppearanceModel(DAMConfig(z_dim=Z_DIM, tex_size=64, n_vertices=30, n_cams=4))
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(AvatarqError, match="is not the one .* was exported from"):
        open_runner(tiny[0], "torch", RunOptions(checkpoint=str(tmp_path / "other.pt")))


def test_manifest_stays_valid_json_after_a_build(bundle):
    build_engine(bundle, "onnxruntime")
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["engines"][0]["rewrite"]["layers"][0]["mode"] == "float"


@pytest.mark.gpu
def test_cuda_provider_matches_cpu_when_onnxruntime_gpu_is_installed(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    z, view = _inputs(2)
    with open_runner(tiny[0], "onnx", RunOptions(device="cpu")) as cpu:
        ref = cpu.decode(z, view)[0].copy()
    with open_runner(tiny[0], "onnx", RunOptions(device="cuda")) as gpu:
        out = gpu.decode(z, view)[0]
    assert np.abs(out - ref).max() < 1e-3 * (ref.max() - ref.min())


def test_build_check_decodes_the_given_latents_and_records_them(bundle, tmp_path):
    from avatarq.core.inputs import smooth_clip
    from avatarq.data.latents import save_inputs

    good = save_inputs(smooth_clip(Z_DIM, 40), tmp_path / "good.npz")
    record = build_engine(bundle, "onnxruntime", BuildOptions(calibration_latents=good))
    assert record.options.calibration_latents == str(good)
    assert record.check.inputs == f"16 steps of {good}"
    assert record.check.n_samples == 16
    bad = save_inputs(smooth_clip(8, 40), tmp_path / "bad.npz")
    with pytest.raises(AvatarqError, match="has z of size 8; the bundle's decoder takes 16"):
        build_engine(bundle, "onnxruntime", BuildOptions(calibration_latents=bad))


def test_build_check_defaults_to_seeded_latents(bundle):
    check = build_engine(bundle, "onnxruntime").check
    assert (check.inputs, check.n_samples) == ("4 seeded N(0, 1) latents", 4)


def test_int8_engine_matches_its_qdq_graph_on_real_latent_codes(small_avatar, tmp_path):
    # Regression: `avatarq build` once gave an INT8 bundle of a trained avatar 64 dB against
    # its own Q/DQ graph on real codes (scales of its own, calibrated on N(0, 1) latents).
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_capture
    from avatarq.core.inputs import DecoderInputs
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization, encode_frames
    from avatarq.engines.compare import compare_bundle
    from avatarq.models import DeployableDecoder, load_checkpoint

    model = load_checkpoint(small_avatar.checkpoint)
    capture = MultifaceCapture(small_avatar.capture_root)
    samples = samples_from_capture(model, capture, n_random=16, n_clips=0, seed=0)
    decoder = DeployableDecoder(model, capture_normalization(capture))
    calibrate(decoder, samples, CalibrationConfig(method="max")).save(tmp_path / "calib")
    options = ExportOptions(int8=True, calib=str(tmp_path / "calib"), validate=False)
    bundle = tmp_path / "dam_int8.avq"
    export_bundle(small_avatar.checkpoint, bundle, small_avatar.capture_root, options)
    segment, frames = next(capture.clips())
    z = encode_frames(model, capture, [(segment, f) for f in frames]).numpy()
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(z), 1))
    build_engine(bundle, "onnxruntime")
    latents = DecoderInputs.from_z_view(z, view)
    result = compare_bundle(bundle, "onnx", "onnxruntime", latents=latents, compute_ssim=False)
    assert result.texture.psnr_min >= 90.0  # worst frame
