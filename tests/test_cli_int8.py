"""`avatarq calibrate` and `avatarq export --int8` from the command line."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from avatarq.cli import app
from avatarq.core.inputs import DecoderInputs
from avatarq.data.latents import save_inputs
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _calibrate(avatar, out):
    return _run(
        "calibrate",
        "--model",
        avatar.checkpoint,
        "--data",
        avatar.capture_root,
        "-o",
        out,
        "--samples",
        8,
        "--iters",
        5,
        "--json",
    )


def test_calibrate_writes_an_artifact_naming_every_layer(small_avatar, tmp_path):
    result = _calibrate(small_avatar, tmp_path / "calib")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed["precision"].values()) == {"w8a8"}
    assert (tmp_path / "calib" / "calib.json").is_file()


def test_calibrate_json_breaks_its_wall_time_down_by_phase(small_avatar, tmp_path):
    seconds = json.loads(_calibrate(small_avatar, tmp_path / "calib").stdout)["seconds"]
    assert {"reading", "rasterizing", "calibrating", "total"} <= set(seconds)
    phases = sum(v for k, v in seconds.items() if k != "total")
    assert phases <= seconds["total"] + 1e-3


def test_export_json_breaks_its_wall_time_down_by_phase(small_avatar, tmp_path):
    result = _run(
        "export", "--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root,
        "--int8", "-o", tmp_path / "int8.avq", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    seconds = json.loads(result.stdout)["seconds"]
    assert {"reading", "tracing", "calibrating", "inserting", "validating", "total"} <= set(seconds)
    phases = sum(v for k, v in seconds.items() if k != "total")
    assert phases <= seconds["total"] + 1e-3


def test_export_int8_from_an_artifact_writes_qdq_on_every_layer(small_avatar, tmp_path):
    assert _calibrate(small_avatar, tmp_path / "calib").exit_code == 0
    out = tmp_path / "int8.avq"
    result = _run(
        "export",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "--int8",
        "--calib",
        tmp_path / "calib",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "w8a8"
    assert manifest["calib_sha256"]
    assert (out / "calib" / "calib.json").is_file()
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= len(manifest["layer_precision"])
    assert "fake-quant" in result.stdout


def test_an_artifact_of_another_model_is_refused_with_one_line(small_avatar, tmp_path):
    assert _calibrate(small_avatar, tmp_path / "calib").exit_code == 0
    other = tmp_path / "other.pt"
    save_checkpoint(
        DeepAppearanceModel(DAMConfig(z_dim=16, tex_size=64, n_vertices=362, n_cams=3)), other
    )
    result = _run(
        "export",
        "--model",
        other,
        "--int8",
        "--calib",
        tmp_path / "calib",
        "-o",
        tmp_path / "x.avq",
    )
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.avq").exists()


def test_calib_without_int8_is_a_user_error(small_avatar, tmp_path):
    result = _run(
        "export", "--model", small_avatar.checkpoint, "--calib", tmp_path, "-o", tmp_path / "x.avq"
    )
    assert result.exit_code == 2
    assert result.stderr == "error: a calibration artifact (--calib) needs --int8 or --fp8\n"


def test_int8_and_fp16_together_are_a_user_error(small_avatar, tmp_path):
    result = _run(
        "export",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "--int8",
        "--fp16",
        "-o",
        tmp_path / "x.avq",
    )
    assert result.exit_code == 2
    assert "exclusive" in result.stderr


@pytest.mark.slow
def test_export_int8_of_a_full_size_multiface_checkpoint_calibrates_on_latents(tmp_path):
    config = DAMConfig()  # z 256, texture 1024, 7306 vertices, 40 cameras
    torch.manual_seed(0)
    save_checkpoint(DeepAppearanceModel(config), tmp_path / "dam.pt")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((12, config.z_dim)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (12, 1))
    save_inputs(DecoderInputs.from_z_view(z, view), tmp_path / "latents.npz")
    out = tmp_path / "full_int8.avq"
    result = _run(
        "export", "--model", tmp_path / "dam.pt", "--int8", "--data", tmp_path / "latents.npz",
        "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["validation"]["passed"] is True
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    layers = sum(ops.count(op) for op in ("Conv", "ConvTranspose", "MatMul", "Gemm"))
    assert ops.count("QuantizeLinear") == layers
    assert ops.count("DequantizeLinear") == 2 * layers
