"""Fuzz: malformed calibration artifacts (calib.json + tensors.npz) given to
`CalibrationArtifact.load` and `avatarq export --int8 --calib` (see fuzz_oracle): wrong
types, deep nesting, NaN/Inf/zero scales, tensors of the wrong shape or dtype, a tensors
path outside the artifact, archives whose headers lie.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatarq.calibration import CalibrationArtifact, CalibrationConfig
from avatarq.errors import AvatarqError
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


@pytest.fixture(scope="module")
def decoder(fuzz_bundle):
    from avatarq.models import DeployableDecoder
    from avatarq.models.checkpoint import load_checkpoint

    return DeployableDecoder(load_checkpoint(fuzz_bundle[0]))


@pytest.fixture(scope="module", params=["nearest", "adaround"])
def artifact(request, fuzz_bundle, tmp_path_factory) -> Path:
    """A calibration of the fuzz DAM: max calibration, rounding to nearest or learned."""
    from avatarq.calibration.from_files import calibrate_decoder
    from avatarq.models.checkpoint import load_checkpoint

    adaround = request.param == "adaround"
    config = CalibrationConfig(
        method="poca" if adaround else "max", iters=1, adaround=adaround, sensitivity="none"
    )
    _, made = calibrate_decoder(load_checkpoint(fuzz_bundle[0]), None, None, config, n_random=4)
    out = tmp_path_factory.mktemp("calib") / "calib"
    made.save(out)
    return out


def copy_artifact(artifact: Path, where: Path) -> Path:
    shutil.copytree(artifact, where / "calib")
    (where / "outside").mkdir()
    shutil.copy(artifact / "tensors.npz", where / "outside" / "tensors.npz")
    return where / "calib"


def edit_json(root: Path, change) -> None:
    doc = json.loads((root / "calib.json").read_text())
    change(doc)
    (root / "calib.json").write_text(json.dumps(doc))


def edit_tensors(root: Path, change) -> None:
    with np.load(root / "tensors.npz") as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(root / "tensors.npz", **arrays)


def first_scale(arrays: dict) -> str:
    return sorted(k for k in arrays if k.endswith("weight_scale"))[0]


def set_scale(value):
    return lambda a: a.update({first_scale(a): np.full_like(a[first_scale(a)], value)})


def layer(k: int, **fields):
    return lambda d: d["layers"][k].update(fields)


CURATED = {
    "calib.json of binary junk": lambda r: (r / "calib.json").write_bytes(bytes(range(256))),
    "calib.json empty": lambda r: (r / "calib.json").write_text(""),
    "calib.json a folder": lambda r: ((r / "calib.json").unlink(), (r / "calib.json").mkdir()),
    "calib.json nested 100000 deep": lambda r: (r / "calib.json").write_text(
        "[" * 100_000 + "]" * 100_000
    ),
    "samples nested deep": lambda r: edit_json(r, lambda d: d.update(samples=[[[[[[]]]]]])),
    "layers an object": lambda r: edit_json(r, lambda d: d.update(layers={"a": 1})),
    "a layer a string": lambda r: edit_json(r, lambda d: d["layers"].__setitem__(0, "dec.z_fc")),
    "model hash a number": lambda r: edit_json(r, lambda d: d["model"].update(hash=5)),
    "NaN input scale": lambda r: (r / "calib.json").write_text(
        (r / "calib.json").read_text().replace('"input_scale": ', '"input_scale": NaN, "x": ', 1)
    ),
    "Infinity input scale": lambda r: edit_json(r, layer(0, input_scale=float("inf"))),
    "zero input scale": lambda r: edit_json(r, layer(0, input_scale=0)),
    "negative input scale": lambda r: edit_json(r, layer(0, input_scale=-1.0)),
    "input scale a string": lambda r: edit_json(r, layer(0, input_scale="0.1")),
    "input scale a bool": lambda r: edit_json(r, layer(0, input_scale=True)),
    "zero point 1000": lambda r: edit_json(r, layer(0, input_zero_point=1000)),
    "weight axis 9": lambda r: edit_json(r, layer(0, weight_axis=9)),
    "weight axis -1": lambda r: edit_json(r, layer(0, weight_axis=-1)),
    "bits 100": lambda r: edit_json(r, layer(0, weight_bits=100)),
    "bits a float": lambda r: edit_json(r, layer(0, act_bits=8.0)),
    "version-1 bits in version 2": lambda r: edit_json(r, layer(0, bits=8)),
    "weight shape negative": lambda r: edit_json(r, layer(0, weight_shape=[-4, 4])),
    "weight shape huge": lambda r: edit_json(r, layer(0, weight_shape=[2**40, 2**40])),
    "unknown precision": lambda r: edit_json(r, layer(0, precision="int3")),
    "unknown rounding": lambda r: edit_json(r, layer(0, rounding="up")),
    "a layer missing": lambda r: edit_json(r, lambda d: d["layers"].pop()),
    "another model's hash": lambda r: edit_json(r, lambda d: d["model"].update(hash="0" * 64)),
    "version 3": lambda r: edit_json(r, lambda d: d.update(version=3)),
    "tensors path ..": lambda r: edit_json(r, lambda d: d.update(tensors="../outside/tensors.npz")),
    "tensors path absolute": lambda r: edit_json(
        r, lambda d: d.update(tensors=os.environ["FUZZ_OUTSIDE"])
    ),
    "tensors path a number": lambda r: edit_json(r, lambda d: d.update(tensors=7)),
    "tensors.npz a link outside": lambda r: (
        (r / "tensors.npz").unlink(),
        os.symlink(os.environ["FUZZ_OUTSIDE"], r / "tensors.npz"),
    ),
    "tensors.npz missing": lambda r: (r / "tensors.npz").unlink(),
    "tensors.npz binary junk": lambda r: (r / "tensors.npz").write_bytes(bytes(range(256))),
    "NaN weight scale": lambda r: edit_tensors(r, set_scale(np.nan)),
    "Inf weight scale": lambda r: edit_tensors(r, set_scale(np.inf)),
    "zero weight scale": lambda r: edit_tensors(r, set_scale(0.0)),
    "float64 scale beyond float32": lambda r: edit_tensors(
        r, lambda a: a.update({first_scale(a): np.full(a[first_scale(a)].shape, 1e300)})
    ),
    "complex weight scale": lambda r: edit_tensors(
        r, lambda a: a.update({first_scale(a): a[first_scale(a)].astype(np.complex64)})
    ),
    "weight scale of the wrong shape": lambda r: edit_tensors(
        r, lambda a: a.update({first_scale(a): np.ones(3, np.float32)})
    ),
    "weight scale missing": lambda r: edit_tensors(r, lambda a: a.pop(first_scale(a))),
    "pickled weight scale": lambda r: _pickled_scale(r),
    "weight integers as floats": lambda r: edit_tensors(
        r, lambda a: a.update({k: np.full(v.shape, np.nan) for k, v in a.items() if "int" in k})
    ),
    "weight integers of the wrong shape": lambda r: edit_tensors(
        r, lambda a: a.update({k: np.zeros(2, np.int8) for k in a if "int" in k})
    ),
}


def _pickled_scale(root: Path) -> None:
    with np.load(root / "tensors.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays[first_scale(arrays)] = np.array([object()] * 3, dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (root / "tensors.npz").write_bytes(buf.getvalue())


#: Cases that only apply to (or only break) one rounding mode: fine to load in the other.
ROUNDING_ONLY = {"weight integers as floats", "weight integers of the wrong shape"}


@pytest.fixture(autouse=True)
def outside_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FUZZ_OUTSIDE", str(tmp_path / "outside" / "tensors.npz"))


@pytest.mark.parametrize("name", list(CURATED))
def test_a_malformed_artifact_is_refused_in_one_line(name, artifact, decoder, tmp_path):
    root = copy_artifact(artifact, tmp_path)
    CURATED[name](root)
    before = snapshot(tmp_path)
    result = call("calibration artifact", CalibrationArtifact.load, root, decoder)
    assert_untouched(before, tmp_path)
    with np.load(artifact / "tensors.npz") as data:
        learned = any(k.endswith("weight_int") for k in data.files)
    if name not in ROUNDING_ONLY or learned:
        assert isinstance(result, AvatarqError)


CLI_CASES = [
    "calib.json nested 100000 deep",
    "NaN input scale",
    "Infinity input scale",
    "weight axis 9",
    "tensors path ..",
    "tensors.npz a link outside",
    "NaN weight scale",
    "complex weight scale",
    "another model's hash",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_export_refuses_a_malformed_artifact_before_any_work(name, artifact, fuzz_bundle, tmp_path):
    root = copy_artifact(artifact, tmp_path)
    CURATED[name](root)
    shutil.copy(fuzz_bundle[0], tmp_path / "dam.pt")
    argv = ["export", "--model", "dam.pt", "--int8", "--calib", "calib", "-o", "q.avq"]
    outcome = run_checked("calibration artifact", argv, tmp_path)
    assert "calib" in outcome.error


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def calib_work(artifact, tmp_path_factory) -> Path:
    """One working copy of the artifact whose calib.json each input replaces (and restores)."""
    return copy_artifact(artifact, tmp_path_factory.mktemp("calibjson"))


@fuzz_settings(100)
@given(data=st.data())
def test_any_calib_json_loads_or_fails_with_one_line(data, calib_work, decoder):
    root = calib_work
    doc = json.loads((root / "calib.json").read_text())
    places = locations(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        try:
            mutate(
                doc,
                data.draw(st.sampled_from(places)),
                data.draw(st.sampled_from(["replace", "delete", "add", "nest"])),
                data.draw(JSON),
            )
        except (KeyError, IndexError, TypeError):
            continue
    with restored(root / "calib.json"):
        (root / "calib.json").write_text(json.dumps(doc))
        before = snapshot(root.parent)
        call("calibration artifact", CalibrationArtifact.load, root, decoder)
        assert_untouched(before, root.parent)
