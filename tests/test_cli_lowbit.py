"""`avatarq calibrate --bits ...`, `avatarq export --fp8`, `avatarq info BUNDLE`, and the
one-line refusals of bad formats and budgets before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from typer.testing import CliRunner

from avatarq.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _calibrate(avatar, out, *extra):
    return _run(
        "calibrate", "--model", avatar.checkpoint, "--data", avatar.capture_root, "-o", out,
        "--samples", 8, "--iters", 3, "--json", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def w4a8_bundle(small_avatar, tmp_path_factory):
    root = tmp_path_factory.mktemp("w4a8")
    result = _calibrate(small_avatar, root / "calib", "--bits", "w4a8", "--bias-format", "fp16")
    assert result.exit_code == 0, result.stderr
    out = root / "w4a8.avq"
    result = _run(
        "export", "--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root,
        "--int8", "--calib", root / "calib", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def test_calibrate_w4a8_then_export_writes_packed_int4_weights(w4a8_bundle):
    model = onnx.load(w4a8_bundle / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    quantized = [i for i in model.graph.initializer if i.name.endswith(".weight_quantized")]
    assert quantized and all(i.data_type == TensorProto.INT4 for i in quantized)
    for init in quantized:
        assert len(init.raw_data) == (int(np.prod(init.dims)) + 1) // 2


def test_the_manifest_states_formats_storage_and_real_sizes(w4a8_bundle):
    manifest = json.loads((w4a8_bundle / "manifest.json").read_text())
    assert manifest["precision"] == "w4a8"
    assert set(manifest["layer_precision"].values()) == {"w4a8"}
    storage = manifest["layer_storage"]["dec.mesh_fc"]
    assert (storage["weight"], storage["scales"], storage["activation"]) == (
        "int4",
        "per-channel",
        "int8",
    )
    sizes = manifest["size_bytes"]
    assert sizes["model.onnx"] == (w4a8_bundle / "model.onnx").stat().st_size
    # the rest of model.onnx is the graph itself (nodes, names, exporter metadata): ~50 kB
    assert sizes["initializers"] <= sizes["model.onnx"] < sizes["initializers"] + 100_000
    assert sizes["fp32_initializers"] > 3 * sizes["initializers"]
    assert manifest["validation"]["passed"] is True


def test_info_on_a_bundle_prints_formats_and_sizes(w4a8_bundle):
    result = _run("info", w4a8_bundle)
    assert result.exit_code == 0, result.stderr
    assert "precision w4a8" in result.stdout
    assert "int4 (per-channel)" in result.stdout
    assert "smaller than the FP32 graph's weights" in result.stdout
    as_json = json.loads(_run("info", w4a8_bundle, "--json").stdout)
    assert as_json["layer_storage"]["dec.mesh_fc"]["weight"] == "int4"


def test_export_fp8_calibrates_and_writes_float8_qdq(small_avatar, tmp_path):
    out = tmp_path / "fp8.avq"
    result = _run(
        "export", "--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root,
        "--fp8", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = onnx.load(out / "model.onnx")
    types = {i.data_type for i in model.graph.initializer if i.name.endswith("zero_point")}
    assert types == {TensorProto.FLOAT8E4M3FN}
    weights = [i for i in model.graph.initializer if i.name.endswith(".weight_quantized")]
    assert {i.data_type for i in weights} == {TensorProto.FLOAT8E4M3FN}
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp8"


def test_export_fp8_refuses_an_integer_calibration(small_avatar, w4a8_bundle, tmp_path):
    result = _run(
        "export", "--model", small_avatar.checkpoint, "--capture", small_avatar.capture_root,
        "--fp8", "--calib", w4a8_bundle / "calib", "-o", tmp_path / "x.avq",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--fp8 needs an FP8 calibration" in result.stderr
    assert not (tmp_path / "x.avq").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bits", "w9a8"], "--bits 'w9a8': weight and activation bits must lie in 2..8"),
        (["--bits", "int4"], "--bits must be one of"),
        (["--bits", "fp16"], "quantized format"),
        (["--fp8", "--bits", "w4a8"], "--fp8 and --bits w4a8 disagree"),
        (["--size-budget", "small"], "--size-budget must be megabytes"),
        (["--size-budget", "0MB"], "--size-budget must be > 0"),
        (["--bias-format", "int2"], "texel bias format"),
        (["--fp8", "--gptq"], "gptq rounds to an integer grid"),
        (["--precision", "dec.z_fc=w4"], "precision override"),
    ],
)
def test_bad_formats_and_budgets_fail_in_one_line_before_any_work(tmp_path, extra, message):
    out = tmp_path / "calib"
    result = _run(
        "calibrate", "--model", tmp_path / "missing.pt", "--data", tmp_path, "-o", out, *extra
    )
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_budget_no_allocation_fits_is_refused_with_the_smallest_size(small_avatar, tmp_path):
    result = _calibrate(
        small_avatar, tmp_path / "calib", "--bits", "w4a8", "--size-budget", "0.01MB"
    )
    assert result.exit_code == 2
    assert "below the smallest allocation" in result.stderr
    assert not (tmp_path / "calib").exists()
