"""``avatarq vq``, the codebook as a bundle component, the runtime's codes, ``bench --vq``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from avatarq.cli import app
from avatarq.codec import load_codebook, pack_codes, unpack_codes
from avatarq.export.bundle import CODEBOOK_FILE, MANIFEST_FILE, open_bundle
from avatarq.runtime import AvatarRuntime

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vq_bundle(small_avatar, small_bundle, tmp_path_factory):
    """A copy of the small FP32 bundle with a 2-stage K=8 codebook trained on its capture."""
    copy = tmp_path_factory.mktemp("vq") / "dam.avq"
    shutil.copytree(small_bundle, copy)
    result = _run(
        "vq",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "--codebook",
        8,
        "--stages",
        2,
        "--bundle",
        copy,
    )
    assert result.exit_code == 0, result.output
    return copy


def test_vq_writes_a_codebook_file_with_its_bits_per_frame(small_avatar, tmp_path):
    out = tmp_path / "codebook.npz"
    args = ["--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root]
    result = _run("vq", *args, "--codebook", 4, "--stages", 3, "--groups", 2, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["bits_per_frame"] == 2 * 3 * 2
    assert record["frames"] == 12  # every frame of the small capture's two segments
    book = load_codebook(out)
    assert (book.codebook_size, book.stages, book.groups, book.z_dim) == (4, 3, 2, 16)


def test_vq_records_the_codebook_in_the_bundle_manifest(vq_bundle):
    bundle = open_bundle(vq_bundle)
    record = bundle.manifest.codebook
    assert record.path == CODEBOOK_FILE
    assert (record.codebook_size, record.stages, record.groups) == (8, 2, 1)
    assert record.bits_per_frame == 6
    assert bundle.codebook().bits_per_frame == 6


def test_info_shows_the_bundle_codebook(vq_bundle):
    result = _run("info", vq_bundle)
    assert result.exit_code == 0, result.output
    assert "codebook    codebook/codebook.npz: K 8 x 2 stage(s) x 1 group(s), 6 bits/frame" in (
        result.stdout
    )


def test_vq_refuses_to_replace_a_bundle_codebook_without_force(small_avatar, vq_bundle):
    before = (vq_bundle / CODEBOOK_FILE).read_bytes()
    result = _run(
        "vq",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "--codebook",
        4,
        "--bundle",
        vq_bundle,
    )
    assert "already has a codebook; pass --force" in _one_error_line(result)
    assert (vq_bundle / CODEBOOK_FILE).read_bytes() == before


def test_vq_never_replaces_a_file_it_did_not_write(small_avatar, tmp_path):
    notes = tmp_path / "notes.npz"
    notes.write_text("mine")
    result = _run(
        "vq",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "--codebook",
        4,
        "-o",
        notes,
        "--force",
    )
    assert "is not an avatarq codebook; refusing to replace it" in _one_error_line(result)
    assert notes.read_text() == "mine"


def test_vq_with_more_centroids_than_capture_frames_is_one_line(small_avatar, tmp_path):
    out = tmp_path / "cb.npz"
    args = ["--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root]
    result = _run("vq", *args, "--codebook", 64, "-o", out)
    line = _one_error_line(result)
    assert "--codebook 64 needs at least 64 training latents, got 12" in line
    assert not out.exists()


def test_vq_without_a_latent_source_is_one_line(tmp_path):
    result = _run("vq", "-o", tmp_path / "cb.npz")
    assert "train on a capture (--model dam.pt --capture CAPTURE)" in _one_error_line(result)


def test_vq_without_an_output_is_one_line(small_avatar):
    result = _run("vq", "--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root)
    assert "say where the codebook goes" in _one_error_line(result)


def test_a_corrupt_bundle_codebook_is_one_line_exit_2(vq_bundle, tmp_path):
    copy = tmp_path / "corrupt.avq"
    shutil.copytree(vq_bundle, copy)
    path = copy / CODEBOOK_FILE
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    result = _run("bench", copy, "--vq", "--render", "none", "-o", tmp_path / "report")
    assert "is not the codebook the manifest pins (sha256 differs)" in _one_error_line(result)
    assert not (tmp_path / "report").exists()


def test_a_codebook_path_outside_the_bundle_is_refused(vq_bundle, tmp_path):
    copy = tmp_path / "escape.avq"
    shutil.copytree(vq_bundle, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["codebook"]["path"] = "../codebook.npz"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = _run("bench", copy, "--vq", "--render", "none")
    assert "codebook path '../codebook.npz' points outside" in _one_error_line(result)


def test_bench_vq_on_a_bundle_without_codebook_is_one_line(small_bundle, tmp_path):
    result = _run("bench", small_bundle, "--vq", "--render", "none", "-o", tmp_path / "r")
    assert "has no codebook; train one with avatarq vq --bundle" in _one_error_line(result)


def test_runtime_decodes_codes_as_the_z_they_stand_for(vq_bundle):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 16)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (3, 1))
    with AvatarRuntime.open(vq_bundle, backend="onnx") as avatar:
        codes = avatar.encode_latents(z)
        payload = pack_codes(codes, avatar.codebook)
        assert len(payload) == 3  # 6 bits a frame, one byte
        received = unpack_codes(payload, avatar.codebook)
        texture, vertices = avatar.decode_codes(received, view)
        expected_tex, expected_vert = avatar.decode(avatar.codebook.decode(codes), view)
    np.testing.assert_array_equal(received, codes)
    np.testing.assert_array_equal(texture, expected_tex)
    np.testing.assert_array_equal(vertices, expected_vert)


def test_bench_vq_reports_bits_per_frame_and_the_codec_cost(vq_bundle, tmp_path):
    result = _run(
        "bench",
        vq_bundle,
        "--vq",
        "--render",
        "none",
        "--warmup",
        0,
        "--iters",
        2,
        "--no-ssim",
        "-o",
        tmp_path / "report",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runners = {r["name"]: r for r in report["runners"]}
    assert set(runners) == {"onnx", "onnx+vq"}
    plain, coded = runners["onnx"], runners["onnx+vq"]
    assert plain["codec"] is None
    assert coded["codec"]["bits_per_frame"] == 6
    assert coded["codec"]["codebook"] == f"dam.avq/{CODEBOOK_FILE}"
    assert plain["texture"]["psnr_mean"] == "Infinity"  # model.onnx is its own reference
    assert 10 < coded["texture"]["psnr_mean"] < 100
    assert coded["texture"]["tde"] > 0
    assert plain["texture"]["t_std"] == plain["texture"]["t_std_reference"]
    assert coded["texture"]["t_std_reference"] == plain["texture"]["t_std_reference"]


def test_vq_trains_on_a_latent_file(tmp_path):
    from avatarq.core.inputs import smooth_clip
    from avatarq.data.latents import save_inputs

    latents = save_inputs(smooth_clip(6, 40, 0), tmp_path / "z.npz")
    out = tmp_path / "cb.npz"
    result = _run("vq", "--latents", latents, "--codebook", 8, "--stages", 2, "-o", out)
    assert result.exit_code == 0, result.output
    book = load_codebook(out)
    assert (book.z_dim, book.frames, book.bits_per_frame) == (6, 40, 6)
    assert book.source == "latent file z.npz (40 steps)"


def test_bench_with_a_codebook_of_another_latent_size_is_one_line(small_bundle, tmp_path):
    from avatarq.codec import VQConfig, train_codebook

    other = train_codebook(np.random.default_rng(0).random((20, 6)), VQConfig(codebook_size=4))
    path = other.save(tmp_path / "cb6.npz")
    result = _run("bench", small_bundle, "--codebook", path, "--render", "none")
    assert "codes z of 6 dimensions, bundle" in _one_error_line(result)
