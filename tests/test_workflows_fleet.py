"""`avatarq fleet`: many identities compiled locally and on Ray, resumable, failures isolated.

The fleet is the example of docs/cli.md, run as printed: three tiny decoders (z 16, texture
64) with smooth latent clips as calibration data, two INT8 and one FP16.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from avatarq.cli import app
from avatarq.core.documents import load_document
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import smooth_clip
from avatarq.data.latents import save_inputs
from avatarq.export import open_bundle
from avatarq.models import DeepAppearanceModel, save_checkpoint
from avatarq.workflows.fleet import FleetSummary, load_fleet, run_fleet
from avatarq.workflows.fleet_identity import IdentityResult, tree_sha256
from tiny_dam import TINY_CONFIG

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
NAMES = ("alice", "bob", "carol")


def _doc_block(marker: str) -> str:
    """The fenced code block right after ``<!-- fleet-example:MARKER -->`` in docs/cli.md."""
    text = DOCS.read_text()
    found = re.search(rf"<!-- fleet-example:{marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"docs/cli.md has no fleet-example:{marker} block"
    return found.group(1)


def _checkpoint(path: Path, seed: int) -> None:
    """A seeded random tiny DAM (weights perturbed off their initial values)."""
    torch.manual_seed(seed)
    model = DeepAppearanceModel(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path)


def _identity(root: Path, name: str, seed: int) -> None:
    _checkpoint(root / name / "dam.pt", seed)
    save_inputs(smooth_clip(TINY_CONFIG.z_dim, 16, seed=seed), root / name / "latents.npz")


def _fleet(root: Path) -> Path:
    """The documented manifest and the inputs it names, in ``root``."""
    for seed, name in enumerate(NAMES):
        _identity(root, name, seed)
    (root / "fleet.json").write_text(_doc_block("manifest"))
    return root


def _add_corrupt_identity(root: Path, name: str = "dave") -> None:
    (root / name).mkdir()
    (root / name / "dam.pt").write_bytes(b"not a checkpoint at all")
    doc = json.loads((root / "fleet.json").read_text())
    doc["identities"].append(
        {"name": name, "checkpoint": f"{name}/dam.pt", "latents": "alice/latents.npz"}
    )
    (root / "fleet.json").write_text(json.dumps(doc, indent=2))


def _run_in(root: Path, args: list[str]):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return runner.invoke(app, args)


def _documented_args(*extra: str) -> list[str]:
    words = shlex.split(_doc_block("command").strip())
    assert words[0] == "avatarq"
    return words[1:] + list(extra)


def _record(out: Path, name: str) -> IdentityResult:
    return load_document(out / name / "identity.json", IdentityResult)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, object]:
    """The documented example, run as printed: (its folder, the CLI result)."""
    root = _fleet(tmp_path_factory.mktemp("fleet"))
    return root, _run_in(root, _documented_args())


@pytest.fixture(scope="module")
def rerun(built, tmp_path_factory) -> tuple[Path, object]:
    """A copy of the built fleet run again after bob's checkpoint changed and a corrupt
    identity dave was added: (its folder, the CLI result with --json)."""
    root = tmp_path_factory.mktemp("rerun") / "fleet"
    shutil.copytree(built[0], root)
    _checkpoint(root / "bob" / "dam.pt", seed=7)
    _add_corrupt_identity(root)
    return root, _run_in(root, _documented_args("--json"))


@pytest.mark.slow
def test_the_documented_example_builds_every_identity(built):
    _, result = built
    assert result.exit_code == 0, result.stderr
    assert "3 built, 0 skipped, 0 failed" in result.stdout


@pytest.mark.slow
def test_each_identity_gets_a_bundle_with_its_engine_and_a_record(built):
    root, _ = built
    out = root / "fleet.out"
    for name, precision in zip(NAMES, ("w8a8", "w8a8", "fp16"), strict=True):
        record = _record(out, name)
        assert record.status == "built" and record.error is None
        assert record.inputs.checkpoint == file_sha256(root / name / "dam.pt")
        assert record.inputs.latents == file_sha256(root / name / "latents.npz")
        bundle = open_bundle(out / record.bundle)
        assert bundle.manifest.precision == precision
        assert bundle.manifest.source_checkpoint_sha256 == record.inputs.checkpoint
        assert [e.backend for e in bundle.manifest.engines] == ["onnxruntime"]
        assert (out / record.engine).is_file()


@pytest.mark.slow
def test_int8_identities_are_calibrated_and_every_graph_is_validated(built):
    out = built[0] / "fleet.out"
    assert (out / "alice" / "calib" / "calib.json").is_file()
    assert not (out / "carol" / "calib").exists()
    for name in NAMES:
        record = _record(out, name)
        assert record.seconds.export > 0 and record.seconds.build > 0
        assert record.validation_psnr_db > 40.0  # vs the FP32 decoder
        assert record.engine_psnr_db > 100.0  # the ORT engine vs its model.onnx
    assert _record(out, "alice").seconds.calibrate > 0
    assert _record(out, "carol").seconds.calibrate == 0


@pytest.mark.slow
def test_the_summary_and_the_index_link_every_identity_in_manifest_order(built):
    out = built[0] / "fleet.out"
    summary = load_document(out / "fleet-summary.json", FleetSummary)
    assert [r.name for r in summary.identities] == list(NAMES)
    assert (summary.built, summary.skipped, summary.failed) == (3, 0, 0)
    assert summary.executor == "process pool, 2 workers"
    markdown = (out / "index.md").read_text()
    page = (out / "index.html").read_text()
    for name in NAMES:
        assert f"| {name} | built |" in markdown
        assert f"[bundle]({name}/bundle.avq/manifest.json)" in markdown
    links = re.findall(r'href="([^"]+)"', page)
    assert len(links) == 9  # bundle, engine and record of each identity
    assert all((out / link).is_file() for link in links)


@pytest.mark.slow
def test_a_second_run_skips_identities_built_from_the_same_inputs(built, rerun):
    root, result = rerun
    summary = json.loads(result.stdout)
    statuses = {r["name"]: r["status"] for r in summary["identities"]}
    assert statuses["alice"] == statuses["carol"] == "skipped"
    for name in ("alice", "carol"):
        before = built[0] / "fleet.out" / name / "bundle.avq" / "manifest.json"
        after = root / "fleet.out" / name / "bundle.avq" / "manifest.json"
        assert after.read_bytes() == before.read_bytes()
        row = next(r for r in summary["identities"] if r["name"] == name)
        assert row["seconds"]["export"] == 0 and row["validation_psnr_db"] > 40.0


@pytest.mark.slow
def test_an_identity_whose_checkpoint_changed_is_built_again(built, rerun):
    root, _ = rerun
    record = _record(root / "fleet.out", "bob")
    assert record.status == "built"
    assert record.inputs_sha256 != _record(built[0] / "fleet.out", "bob").inputs_sha256
    bundle = open_bundle(root / "fleet.out" / "bob" / "bundle.avq")
    assert bundle.manifest.source_checkpoint_sha256 == file_sha256(root / "bob" / "dam.pt")


@pytest.mark.slow
def test_a_failing_identity_is_reported_with_one_line_and_the_others_finish(rerun):
    root, result = rerun
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["built"], summary["skipped"], summary["failed"]) == (1, 2, 1)
    dave = next(r for r in summary["identities"] if r["name"] == "dave")
    assert dave["status"] == "failed"
    assert (
        dave["error"]
        == f"{root / 'dave' / 'dam.pt'} is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    )
    assert _record(root / "fleet.out", "dave").status == "failed"
    assert not (root / "fleet.out" / "dave" / "bundle.avq").exists()


@pytest.mark.slow
def test_the_same_identities_build_on_a_local_ray_instance(built, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'avatarq[fleet]')")
    root = tmp_path / "fleet"
    shutil.copytree(built[0], root, ignore=shutil.ignore_patterns("fleet.out"))
    _add_corrupt_identity(root)
    result = _run_in(root, _documented_args("--out", "ray.out", "--ray", "local", "--json"))
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["executor"] == "ray local"
    assert [(r["name"], r["status"]) for r in summary["identities"]] == [
        ("alice", "built"),
        ("bob", "built"),
        ("carol", "built"),
        ("dave", "failed"),
    ]
    assert "is not a PyTorch checkpoint" in summary["identities"][3]["error"]
    for name in NAMES:  # the same bundles as the process pool's
        on_ray = open_bundle(root / "ray.out" / name / "bundle.avq").manifest
        local = open_bundle(built[0] / "fleet.out" / name / "bundle.avq").manifest
        assert on_ray.model_sha256 == local.model_sha256


def test_ray_missing_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    root = _fleet(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when not installed
    result = _run_in(root, ["fleet", "fleet.json", "--ray", "auto"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --ray needs Ray, which is not installed; pip install 'avatarq[fleet]' (or pip install ray)"
    ]
    assert not (root / "fleet.out").exists()


def test_a_folder_avatarq_did_not_write_is_left_alone(tmp_path):
    root = tmp_path
    _identity(root, "alice", 0)
    (root / "fleet.json").write_text(
        json.dumps(
            {
                "version": 1,
                "identities": [
                    {"name": "alice", "checkpoint": "alice/dam.pt", "latents": "alice/latents.npz"}
                ],
            }
        )
    )
    notes = root / "fleet.out" / "alice" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    result = _run_in(root, ["fleet", "fleet.json", "--json"])
    assert result.exit_code == 1
    (alice,) = json.loads(result.stdout)["identities"]
    assert alice["error"].startswith(
        f"{root / 'fleet.out' / 'alice'} exists and was not written by avatarq fleet"
    )
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"]
    assert notes.read_text() == "mine"


def test_options_merge_key_by_key_over_the_defaults(tmp_path):
    plan = load_fleet(_fleet(tmp_path) / "fleet.json")
    carol = plan.identities[2].options
    assert (carol.precision, carol.calibration.method, carol.calibration.samples) == (
        "fp16",
        "max",
        16,
    )
    assert carol.export.n_validation == 4 and carol.export.max_batch == 64
    assert plan.identities[0].options.precision == "int8"


def test_a_toml_manifest_reads_like_its_json(tmp_path):
    pytest.importorskip("tomllib", reason="TOML manifests need Python 3.11+")
    root = _fleet(tmp_path)
    (root / "fleet.toml").write_text(
        """version = 1
[defaults]
precision = "int8"
calibration = {method = "max", samples = 16}
export = {n_validation = 4}
build = {backend = "onnxruntime"}
[[identities]]
name = "alice"
checkpoint = "alice/dam.pt"
latents = "alice/latents.npz"
[[identities]]
name = "bob"
checkpoint = "bob/dam.pt"
latents = "bob/latents.npz"
[[identities]]
name = "carol"
checkpoint = "carol/dam.pt"
latents = "carol/latents.npz"
options = {precision = "fp16"}
"""
    )
    assert load_fleet(root / "fleet.toml").identities == load_fleet(root / "fleet.json").identities


def _entry(**changes):
    return {
        "name": "alice",
        "checkpoint": "alice/dam.pt",
        "latents": "alice/latents.npz",
        **changes,
    }


BAD_MANIFESTS = {
    "not JSON": ("{version: 1", "is not valid JSON"),
    "a list": ([], "must hold an object with version and identities"),
    "unknown key": (
        {"version": 1, "defualts": {}, "identities": [_entry()]},
        "defualts: unknown field",
    ),
    "another version": (
        {"version": 2, "identities": [_entry()]},
        "version is 2; this avatarq reads fleet manifests of version 1",
    ),
    "no identities": ({"version": 1, "identities": []}, "identities is empty"),
    "wrong type": (
        {"version": 1, "identities": [_entry(options={"calibration": {"samples": "many"}})]},
        "identities.0.options.calibration.samples: input should be a valid integer",
    ),
    "unsafe name": (
        {"version": 1, "identities": [_entry(name="../alice")]},
        "identity '../alice' (#0): name must be",
    ),
    "reserved name": (
        {"version": 1, "identities": [_entry(name="index.html")]},
        "identity 'index.html' (#0): name must be",
    ),
    "repeated name": (
        {"version": 1, "identities": [_entry(), _entry(name="ALICE")]},
        "identity name 'ALICE' (#1) repeats 'alice'",
    ),
    "missing checkpoint": (
        {"version": 1, "identities": [_entry(checkpoint="alice/nope.pt")]},
        "identity 'alice' (#0): checkpoint 'alice/nope.pt' not found",
    ),
    "capture not a folder": (
        {"version": 1, "identities": [_entry(capture="alice/dam.pt")]},
        "capture 'alice/dam.pt' is not a folder",
    ),
    "bad tau": (
        {"version": 1, "defaults": {"calibration": {"tau": 1.5}}, "identities": [_entry()]},
        "identity 'alice' (#0): calibration: tau must lie in [0, 1), got 1.5",
    ),
    "bad batch profile": (
        {"version": 1, "identities": [_entry(options={"build": {"min_batch": 4, "opt_batch": 2}})]},
        "build: batch profile must satisfy min <= opt <= max",
    ),
    "unknown backend": (
        {"version": 1, "identities": [_entry(options={"build": {"backend": "tpu"}})]},
        "unknown backend 'tpu'",
    ),
    "backend without engine": (
        {"version": 1, "identities": [_entry(options={"build": {"backend": "onnx"}})]},
        "build.backend 'onnx' builds no engine",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_is_one_line_and_exit_2_before_any_work(tmp_path, case):
    document, expected = BAD_MANIFESTS[case]
    _identity(tmp_path, "alice", 0)
    text = document if isinstance(document, str) else json.dumps(document)
    (tmp_path / "fleet.json").write_text(text)
    result = _run_in(tmp_path, ["fleet", "fleet.json"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fleet manifest fleet.json")
    assert expected in lines[0]
    assert not (tmp_path / "fleet.out").exists()


def test_the_fleet_library_imports_neither_ray_nor_torch_until_it_runs():
    code = (
        "import sys, avatarq.workflows.fleet; "
        "print(','.join(m for m in ('ray', 'torch', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_capture_hash_covers_every_file_and_its_path(tmp_path):
    first = tmp_path / "first"
    (first / "frames").mkdir(parents=True)
    (first / "frames" / "000.bin").write_bytes(b"\x00\x01")
    (first / "mesh.obj").write_text("v 0 0 0\n")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    assert tree_sha256(first) == tree_sha256(second)
    (second / "frames" / "000.bin").write_bytes(b"\x00\x02")
    assert tree_sha256(first) != tree_sha256(second)
    shutil.rmtree(second)
    shutil.copytree(first, second)
    (second / "frames" / "000.bin").rename(second / "frames" / "001.bin")
    assert tree_sha256(first) != tree_sha256(second)


@pytest.mark.slow
def test_an_identity_with_a_capture_is_calibrated_on_it_and_folds_its_normalization(
    small_avatar, tmp_path
):
    manifest = tmp_path / "fleet.json"
    manifest.write_text(
        json.dumps(
            {
                "version": 1,
                "defaults": {"calibration": {"method": "max", "samples": 8}},
                "identities": [
                    {
                        "name": "synth",
                        "checkpoint": str(small_avatar.checkpoint),
                        "capture": str(small_avatar.capture_root),
                    }
                ],
            }
        )
    )
    summary = run_fleet(manifest, tmp_path / "out")
    (record,) = summary.identities
    assert record.status == "built", record.error
    assert record.inputs.capture == tree_sha256(small_avatar.capture_root)
    assert record.inputs.latents is None
    bundle = open_bundle(tmp_path / "out" / record.bundle)
    assert bundle.manifest.normalization.folded
    assert (bundle.root / "topology.npz").is_file()
    assert record.validation_psnr_db > 30.0
