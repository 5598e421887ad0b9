"""Fuzz: malformed bundles - manifest.json, engine records, the files they name (see
fuzz_oracle). Wrong types, deep nesting, unknown keys, paths outside the bundle (``..``,
absolute, symbolic links), swapped or missing graphs; through build, compare and bench.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarq.core.hashing import file_sha256
from avatarq.engines.base import checked_engine_file
from avatarq.errors import AvatarqError
from avatarq.export.bundle import is_bundle, open_bundle
from fuzz_oracle import (
    JSON,
    assert_untouched,
    call,
    fuzz_settings,
    locations,
    mutate,
    restored,
    run_checked,
    snapshot,
)

TRT_ENGINE = "engines/tensorrt-sm89.engine"


@pytest.fixture(scope="module")
def built(fuzz_bundle, tmp_path_factory) -> Path:
    """The fuzz bundle with an ONNX Runtime engine built and a TensorRT record (its engine,
    timing cache and layer list are placeholder files pinned by sha256)."""
    from avatarq.engines import build_engine

    root = tmp_path_factory.mktemp("built") / "b.avq"
    shutil.copytree(fuzz_bundle[1], root)
    build_engine(root, "onnxruntime")
    manifest = json.loads((root / "manifest.json").read_text())
    record = dict(manifest["engines"][0])
    for name in (TRT_ENGINE, "engines/timing.cache", "engines/layers.json"):
        (root / name).write_bytes(name.encode())
    for key in ("check", "rewrite", "float_evaluation", "optimized_ops"):
        record.pop(key, None)
    record.update(
        backend="tensorrt",
        path=TRT_ENGINE,
        target="sm89",
        sha256=file_sha256(root / TRT_ENGINE),
        io={"z": {"mode": "input", "dtype": "float32", "shape": [-1, 4]}},
        timing_cache="engines/timing.cache",
        layers="engines/layers.json",
    )
    manifest["engines"].append(record)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    open_bundle(root)  # still a valid bundle
    return root


def inspect_bundle(root: Path) -> Any:
    """Everything a command reads from a bundle before it runs anything."""
    bundle = open_bundle(root)
    bundle.checked_model_path()
    bundle.reference_path()
    bundle.normalization_arrays()
    for record in bundle.manifest.engines:
        checked_engine_file(bundle, record)
    return bundle


def copy_bundle(built: Path, where: Path) -> Path:
    shutil.copytree(built, where / "b.avq", symlinks=True)
    (where / "outside").mkdir()
    (where / "outside" / "secret.onnx").write_bytes((built / "model.onnx").read_bytes())
    return where / "b.avq"


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def set_engine_path(path: str):
    def change(m):
        m["engines"][0]["path"] = path
        m["engines"][0]["sha256"] = file_sha256(Path(os.environ["FUZZ_OUTSIDE"]))

    return change


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def _other_graph(root: Path) -> None:
    """model.onnx replaced by the graph of another DAM (z 8, 10 vertices), sha repinned."""
    import torch

    from avatarq.export import ExportOptions, export_bundle
    from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

    torch.manual_seed(1)
    config = DAMConfig(z_dim=8, tex_size=16, n_vertices=10, n_cams=2, has_encoder=False)
    save_checkpoint(DeepAppearanceModel(config), root.parent / "other.pt")
    export_bundle(
        root.parent / "other.pt", root.parent / "other.avq", options=ExportOptions(validate=False)
    )
    shutil.copy(root.parent / "other.avq" / "model.onnx", root / "model.onnx")
    shutil.rmtree(root.parent / "other.avq")
    (root.parent / "other.pt").unlink()
    edit_manifest(root, lambda m: m.update(model_sha256=file_sha256(root / "model.onnx")))


def _repinned_junk(root: Path) -> None:
    (root / "model.onnx").write_bytes(b"\x08\x07junk" * 50)
    edit_manifest(root, lambda m: m.update(model_sha256=file_sha256(root / "model.onnx")))


def _link(root: Path, name: str, target: Path) -> None:
    path = root / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.symlink(target, path)


CURATED = {
    "manifest of binary junk": lambda r: (r / "manifest.json").write_bytes(bytes(range(256))),
    "empty manifest": lambda r: (r / "manifest.json").write_bytes(b""),
    "manifest a folder": lambda r: ((r / "manifest.json").unlink(), (r / "manifest.json").mkdir()),
    "manifest nested 100000 deep": lambda r: (
        edit_manifest(r, lambda m: m.update(arch=0))
        or (r / "manifest.json").write_text(
            (r / "manifest.json").read_text().replace('"arch": 0', '"arch": ' + _nest(100_000))
        )
    ),
    "manifest a list": lambda r: (r / "manifest.json").write_text("[1, 2]"),
    "schema_version a string": lambda r: edit_manifest(r, lambda m: m.update(schema_version="2")),
    "z_dim negative": lambda r: edit_manifest(r, lambda m: m.update(z_dim=-1)),
    "tex_size a float": lambda r: edit_manifest(r, lambda m: m.update(tex_size=16.0)),
    "a zero dimension": lambda r: edit_manifest(
        r, lambda m: m["outputs"][0].update(shape=["batch", 3, 0, 16])
    ),
    "an unknown key": lambda r: edit_manifest(r, lambda m: m.update(extra=1)),
    "engine size a string": lambda r: edit_manifest(
        r, lambda m: m["engines"][0].update(size_bytes="big")
    ),
    "an unknown backend": lambda r: edit_manifest(
        r, lambda m: m["engines"][0].update(backend="mystery")
    ),
    "engine path ..": lambda r: edit_manifest(r, set_engine_path("../outside/secret.onnx")),
    "engine path absolute": lambda r: edit_manifest(r, set_engine_path(os.environ["FUZZ_OUTSIDE"])),
    "engine file a link outside": lambda r: _link(
        r, "engines/onnxruntime-cpu.onnx", r.parent / "outside" / "secret.onnx"
    ),
    "engines folder a link outside": lambda r: _link(r, "engines", r.parent / "outside"),
    "engines folder a file": lambda r: (
        shutil.rmtree(r / "engines"),
        (r / "engines").write_text("x"),
    ),
    "engines folder a link outside, no engine recorded": lambda r: (
        edit_manifest(r, lambda m: m.update(engines=[])),
        _link(r, "engines", r.parent / "outside"),
    ),
    "timing cache path outside": lambda r: edit_manifest(
        r, lambda m: m["engines"][1].update(timing_cache="../outside/secret.onnx")
    ),
    "model.onnx a link outside": lambda r: _link(
        r, "model.onnx", r.parent / "outside" / "secret.onnx"
    ),
    "model.onnx missing": lambda r: (r / "model.onnx").unlink(),
    "model.onnx of another bundle": lambda r: shutil.copy(
        r / "engines" / "onnxruntime-cpu.onnx", r / "model.onnx"
    ),
    "model.onnx of another shape, sha repinned": _other_graph,
    "model.onnx junk, sha repinned": _repinned_junk,
    "reference path outside": lambda r: edit_manifest(
        r, lambda m: m.update(reference={"path": "../outside/secret.onnx", "sha256": "0" * 64})
    ),
    "normalization path outside": lambda r: edit_manifest(
        r, lambda m: m["normalization"].update(arrays="/etc/passwd")
    ),
    "normalization of NaN": lambda r: _nan_normalization(r),
    "engine file altered": lambda r: (r / "engines" / "onnxruntime-cpu.onnx").write_bytes(b"x"),
}


def _nan_normalization(root: Path) -> None:
    import numpy as np

    np.savez(
        root / "normalization.npz",
        tex_mean=np.full((3, 16, 16), np.nan, np.float32),
        tex_std=np.float32(1),
        vert_mean=np.zeros(18, np.float32),
        vert_std=np.float32(1),
    )
    edit_manifest(root, lambda m: m["normalization"].update(arrays="normalization.npz"))


@pytest.fixture(autouse=True)
def outside_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FUZZ_OUTSIDE", str(tmp_path / "outside" / "secret.onnx"))


@pytest.mark.parametrize("name", list(CURATED))
def test_a_malformed_bundle_is_refused_in_one_line(name, built, tmp_path):
    root = copy_bundle(built, tmp_path)
    CURATED[name](root)
    before = snapshot(tmp_path)
    result = call("bundle", inspect_bundle, root)
    assert_untouched(before, tmp_path)
    if name not in ("engine file altered", "engines folder a file") and "no engine" not in name:
        assert isinstance(result, AvatarqError)


COMMANDS = {
    "build": ["build", "b.avq", "--no-rewrite"],
    "compare": ["compare", "b.avq", "--frames", "2", "--no-ssim"],
    "bench": ["bench", "b.avq", "--iters", "1", "--warmup", "0", "--no-ssim", "-o", "rep"],
}


#: (command, case) pairs where the command may succeed: what is broken is not what it reads
#: (an unfolded bundle's normalization), or it replaces it (build rebuilds a bad engine),
#: or bench skips a default runner that cannot run and says so.
MAY_SUCCEED = {
    ("build", "engine file altered"),
    ("build", "normalization of NaN"),
    ("compare", "normalization of NaN"),
    ("bench", "engine file altered"),
    ("bench", "engines folder a file"),
    ("bench", "engines folder a link outside, no engine recorded"),
    ("compare", "engines folder a link outside, no engine recorded"),
}


def _written_by(command: str):
    """Paths a successful ``command`` writes or updates (its outputs)."""
    return lambda rel: (
        rel.startswith("rep")
        if command == "bench"
        else rel in ("b.avq/manifest.json", "b.avq/engines") or rel.startswith("b.avq/engines/")
        if command == "build"
        else False
    )


@pytest.mark.parametrize("name", list(CURATED))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_refuse_a_malformed_bundle_in_one_line(command, name, built, tmp_path):
    root = copy_bundle(built, tmp_path)
    CURATED[name](root)
    may = (command, name) in MAY_SUCCEED
    outcome = run_checked(
        "bundle",
        COMMANDS[command],
        tmp_path,
        expect=None if may else 2,
        new_allowed=_written_by(command),
        changed_allowed=_written_by(command),
    )
    assert outcome.code in ((0, 2) if may else (2,))


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def manifest_locations(built) -> list[tuple]:
    return locations(json.loads((built / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def manifest_work(built, tmp_path_factory) -> Path:
    """One working copy of the built bundle whose manifest each input replaces (and restores)."""
    return copy_bundle(built, tmp_path_factory.mktemp("manifest"))


@fuzz_settings(200)
@given(data=st.data())
def test_any_manifest_opens_or_fails_with_one_line(data, manifest_work, manifest_locations):
    root = manifest_work
    doc = json.loads((root / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(manifest_locations))
        how = data.draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        try:
            mutate(doc, where, how, data.draw(JSON))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the place
    with restored(root / "manifest.json"):
        (root / "manifest.json").write_text(json.dumps(doc))
        before = snapshot(root.parent)
        call("bundle", is_bundle, root)
        call("bundle", inspect_bundle, root)
        assert_untouched(before, root.parent)
