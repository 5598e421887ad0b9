"""The command line: what users type, what they see, exit codes."""

import json

import pytest
import torch
from typer.testing import CliRunner

from avatarq import __version__
from avatarq.cli import app
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    result = _run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"avatarq {__version__}"


@pytest.mark.parametrize("command", ["info", "synth", "export", "demo"])
def test_every_command_has_help_with_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert "Example: avatarq" in result.stdout


def test_info_prints_arch_sizes_and_parameter_counts(tmp_path):
    config = DAMConfig(arch="warp", z_dim=16, tex_size=64, n_vertices=40, n_cams=5)
    save_checkpoint(DeepAppearanceModel(config), tmp_path / "dam.pt")
    result = _run("info", tmp_path / "dam.pt", "--json")
    assert result.exit_code == 0
    described = json.loads(result.stdout)
    assert described["config"]["arch"] == "warp"
    assert described["config"]["n_cams"] == 5
    assert described["parameters"]["total"] == sum(
        p.numel() for p in DeepAppearanceModel(config).parameters()
    )


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "published"), [("base", "24,313,818"), ("warp", "33,134,492")])
def test_info_on_a_full_size_checkpoint_shows_the_published_count(tmp_path, arch, published):
    save_checkpoint(DeepAppearanceModel(DAMConfig(arch=arch)), tmp_path / "dam.pt")
    result = _run("info", tmp_path / "dam.pt")
    assert result.exit_code == 0
    assert published in result.stdout


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing.pt"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    unknown = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), unknown)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(
        DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=16, n_vertices=4, n_cams=2)), truncated
    )
    truncated.write_bytes(truncated.read_bytes()[:300])
    return {"missing": missing, "text": text, "unknown": unknown, "truncated": truncated}


@pytest.mark.parametrize("case", ["missing", "text", "unknown", "truncated"])
@pytest.mark.parametrize("command", ["info", "export"])
def test_bad_checkpoint_gives_exit_2_and_one_line(tmp_path, case, command):
    path = _bad_inputs(tmp_path)[case]
    args = (
        ["info", path]
        if command == "info"
        else ["export", "--model", path, "-o", tmp_path / "o.avq"]
    )
    result = _run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "o.avq").exists()


def test_export_writes_a_validated_bundle(small_avatar, tmp_path):
    out = tmp_path / "dam.avq"
    result = _run(
        "export",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        small_avatar.capture_root,
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["validation"]["passed"] is True
    assert (out / "model.onnx").is_file()


def test_export_with_a_missing_capture_is_a_user_error(small_avatar, tmp_path):
    result = _run(
        "export",
        "--model",
        small_avatar.checkpoint,
        "--capture",
        tmp_path / "nowhere",
        "-o",
        tmp_path / "x.avq",
    )
    assert result.exit_code == 2
    assert "capture root not found" in result.stderr
