"""Your own decoder from the command line: examples/hnerv_decoder.py, never seen by avatarq."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from avatarq.cli import app
from avatarq.core.inputs import smooth_clip
from avatarq.data.latents import save_inputs

runner = CliRunner()
EXAMPLE = Path(__file__).parent.parent / "examples" / "hnerv_decoder.py"
DECLARE = ["--model", f"{EXAMPLE}:hnerv", "--input", "z:32", "--input", "view:3"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latents") / "latents.npz"
    save_inputs(smooth_clip(32, 24, seed=3, cone_deg=20.0), path)
    return path


@pytest.mark.slow
def test_export_int8_build_and_bench_a_decoder_avatarq_has_never_seen(latents, tmp_path):
    bundle = tmp_path / "hnerv.avq"
    exported = _run(
        "export", *DECLARE, "--texture-output", "rgb", "--int8", "--data", latents, "-o", bundle
    )
    assert exported.exit_code == 0, exported.stderr
    graph = onnx.load(bundle / "model.onnx").graph
    assert [o.name for o in graph.output] == ["rgb", "alpha"]
    assert "DepthToSpace" in {n.op_type for n in graph.node}
    built = _run("build", bundle, "--backend", "onnxruntime")
    assert built.exit_code == 0, built.stderr
    report = tmp_path / "report"
    benched = _run(
        "bench",
        bundle,
        "--sequence",
        latents,
        "--runner",
        "onnxruntime",
        "--iters",
        5,
        "--warmup",
        1,
        "-o",
        report,
        "--json",
    )
    assert benched.exit_code == 0, benched.stderr
    result = json.loads((report / "report.json").read_text())
    (run,) = result["runners"]
    assert run["name"] == "onnxruntime"
    assert 30.0 < run["texture"]["psnr_mean"] < 100.0
    assert result["render"]["note"] == "the decoder has no mesh output"


@pytest.mark.slow
def test_calibrate_then_export_with_the_artifact(latents, tmp_path):
    calibrated = _run(
        "calibrate",
        *DECLARE,
        "--texture-output",
        "0",
        "--data",
        latents,
        "--iters",
        2,
        "--samples",
        8,
        "-o",
        tmp_path / "calib",
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    exported = _run(
        "export",
        *DECLARE,
        "--texture-output",
        "0",
        "--int8",
        "--calib",
        tmp_path / "calib",
        "-o",
        tmp_path / "q.avq",
        "--json",
    )
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["precision"] == "mixed"  # the alpha head stays float
    manifest = json.loads((tmp_path / "q.avq" / "manifest.json").read_text())
    assert manifest["layer_precision"]["model.alpha"] == "fp32"
    assert manifest["layer_precision"]["model.rgb"] == "w8a8"


def test_a_declared_decoder_without_texture_output_is_one_line(tmp_path):
    result = _run("export", *DECLARE, "-o", tmp_path / "x.avq")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --model {EXAMPLE}:hnerv is your own decoder: name the output the metrics "
        "judge with --texture-output NAME_OR_INDEX"
    ]


def test_declaration_options_on_a_checkpoint_are_refused(tmp_path):
    result = _run("export", "--model", tmp_path / "dam.pt", "--input", "z:8", "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert "--input declare your own decoder: --model path/to/file.py:factory" in result.stderr


def test_an_unknown_factory_is_one_line(tmp_path):
    result = _run(
        "export",
        "--model",
        f"{EXAMPLE}:nope",
        "--input",
        "z:32",
        "--input",
        "view:3",
        "--texture-output",
        "rgb",
        "-o",
        tmp_path / "x.avq",
    )
    assert result.exit_code == 2
    assert "hnerv_decoder.py defines no function 'nope'" in result.stderr
    assert not (tmp_path / "x.avq").exists()


def test_latents_without_a_declared_input_are_refused_before_export(tmp_path):
    path = tmp_path / "zonly.npz"
    np.savez(path, code=np.zeros((4, 32), np.float32))
    result = _run(
        "export",
        *DECLARE,
        "--texture-output",
        "rgb",
        "--int8",
        "--data",
        path,
        "-o",
        tmp_path / "x.avq",
    )
    assert result.exit_code == 2
    assert "the calibration data has no array 'z'" in result.stderr
    assert not (tmp_path / "x.avq").exists()
