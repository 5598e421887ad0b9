"""The headline commands as a new user types them, and how the CLI reports mistakes."""

from __future__ import annotations

import json

import pytest
import torch

from avatarq.cli import main
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

TINY = DAMConfig(z_dim=16, tex_size=64, n_vertices=30, n_cams=4, has_encoder=False)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """An empty folder holding only dam.pt (a random tiny base DAM, no capture)."""
    folder = tmp_path_factory.mktemp("bare")
    torch.manual_seed(0)
    model = DeepAppearanceModel(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, folder / "dam.pt")
    return folder


@pytest.fixture(scope="module")
def exported(bare):
    """`avatarq export --model dam.pt --int8` run inside the folder, as typed."""
    import os

    cwd = os.getcwd()
    os.chdir(bare)
    try:
        code = main(["export", "--model", "dam.pt", "--int8", "--json"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return bare / "dam_int8.avq"


def test_export_int8_as_typed_writes_dam_int8_next_to_the_checkpoint(exported):
    assert sorted(p.name for p in exported.parent.iterdir()) == ["dam.pt", "dam_int8.avq"]
    names = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "manifest.json", "reference", "calib"} <= names


def test_the_bundle_says_its_calibration_was_data_free(exported):
    calib = json.loads((exported / "calib" / "calib.json").read_text())
    assert calib["samples"]["source"].startswith("data-free: z ~ N(0, I)")


def test_bench_on_the_bare_bundle_writes_its_report(exported, capsys, monkeypatch):
    monkeypatch.chdir(exported.parent)
    code, out, err = run(capsys, "bench", "dam_int8.avq", "--iters", "2", "--warmup", "0")
    assert (code, err) == (0, "")
    report = json.loads((exported.parent / "dam_int8_report" / "report.json").read_text())
    assert report["reference"]["label"].startswith("FP32 dam_int8.avq/reference/model.onnx")
    assert report["sequence"]["texture_units"].startswith("Multiface-normalized units")
    assert report["runners"][0]["texture"]["psnr_mean"] > 40


def test_exporting_again_needs_force(exported, capsys, monkeypatch):
    monkeypatch.chdir(exported.parent)
    before = (exported / "manifest.json").read_bytes()
    code, _, err = run(capsys, "export", "--model", "dam.pt", "-o", "dam_int8.avq")
    assert code == 2 and err == "error: dam_int8.avq exists; pass --force to replace that bundle\n"
    assert (exported / "manifest.json").read_bytes() == before


def test_a_folder_that_is_not_a_bundle_is_never_replaced(bare, capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"my": "own file"}')
    code, _, err = run(capsys, "export", "--model", bare / "dam.pt", "-o", mine, "--force")
    assert code == 2 and "is not an avatarq bundle; refusing to replace it" in err
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["export"], "Missing option '--model' / '-m'. (see: avatarq export --help)"),
        (["export", "--model", "x.pt", "--bogus"], "No such option: --bogus"),
        (["build"], "Missing argument 'bundle'."),
        (["export", "--model", "x.pt", "--max-batch", "0"], "Invalid value for '--max-batch'"),
        (["export", "--model", "x.pt", "--seed", "-1"], "Invalid value for '--seed'"),
        (["synth", "out", "--arch", "foo"], "unknown arch 'foo'"),
        (["synth", "out", "--iters", "-5"], "iters must be an integer in 1..10000000"),
        (["info", "missing.pt"], "checkpoint not found: missing.pt"),
    ],
)
def test_mistakes_are_one_line_with_exit_code_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written before the options were checked


def test_no_arguments_prints_the_help(capsys):
    code, out, _ = run(capsys)
    assert code == 0 and "Commands:" in out and "export" in out


def test_a_perceptual_score_needs_display_units(exported, capsys, monkeypatch):
    monkeypatch.chdir(exported.parent)
    code, out, err = run(capsys, "bench", "dam_int8.avq", "--perceptual", "fvvdp")
    assert code == 2
    assert err == (
        "error: --perceptual needs textures in display units, but bundle dam_int8.avq carries "
        "no normalization arrays and no capture was given; pass --capture CAPTURE\n"
    )
