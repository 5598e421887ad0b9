"""Fuzz: bad options of every command (see fuzz_oracle): zero, negative, huge and NaN
numbers, unknown names, output paths that are files, under files or someone else's folder.

Each must be refused in one line *before any work starts*: the functions that do the work
(tracing, calibrating, training, building, decoding) are replaced by tripwires for these
tests, so reaching one fails the test with the option that got through.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_oracle import fuzz_settings, run_checked


class WorkStarted(AssertionError):
    """Raised by a tripwire: a command started working before it refused a bad option."""


def _tripwire(what: str):
    def fire(*args, **kwargs):
        raise WorkStarted(f"{what} started before the options were checked")

    return fire


#: (module, class or None, function) where each command's real work begins.
WORK = [
    ("avatarq.export.exporter", None, "export_onnx"),
    ("avatarq.calibration.pipeline", None, "calibrate"),
    ("avatarq.calibration.from_files", None, "calibrate"),
    ("avatarq.data.synthetic", None, "write_synthetic_capture"),
    ("avatarq.data.synthetic", None, "train_dam"),
    ("avatarq.engines.onnxruntime", "OnnxRuntimeBuilder", "build"),
    ("avatarq.engines.compare", None, "compare"),
    ("avatarq.bench.harness", None, "_fidelity_pass"),
    ("avatarq.bench.harness", None, "time_runners"),
]


@pytest.fixture
def tripwires(monkeypatch):
    import importlib

    import avatarq.cli  # noqa: F401 - every command registered

    for module, owner, name in WORK:
        target = importlib.import_module(module)
        target = getattr(target, owner) if owner else target
        monkeypatch.setattr(target, name, _tripwire(f"{module}.{owner or ''}.{name}"))


@pytest.fixture
def workspace(fuzz_bundle, tmp_path) -> Path:
    """A folder holding dam.pt, b.avq (a bundle), a file, someone else's folder, a
    calibration avatarq wrote and an empty latents placeholder, as a user's folder might."""
    shutil.copy(fuzz_bundle[0], tmp_path / "dam.pt")
    shutil.copytree(fuzz_bundle[1], tmp_path / "b.avq")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text('{"my": "file"}')
    (tmp_path / "mine" / "calib.json").write_text('{"my": "file"}')
    (tmp_path / "mine" / "report.json").write_text('{"my": "file"}')
    return tmp_path


EXPORT = ["export", "--model", "dam.pt", "-o", "out.avq"]
CALIBRATE = ["calibrate", "--model", "dam.pt", "-o", "cal"]
BUILD = ["build", "b.avq"]
COMPARE = ["compare", "b.avq"]
BENCH = ["bench", "b.avq", "-o", "rep"]
SYNTH = ["synth", "syn"]

CASES: dict[str, list[str]] = {
    # export
    "export --max-batch 0": [*EXPORT, "--max-batch", "0"],
    "export --max-batch -1": [*EXPORT, "--max-batch", "-1"],
    "export --max-batch huge": [*EXPORT, "--max-batch", str(2**40)],
    "export --max-batch nan": [*EXPORT, "--max-batch", "nan"],
    "export --seed -1": [*EXPORT, "--seed", "-1"],
    "export --seed 2^40": [*EXPORT, "--seed", str(2**40)],
    "export --seed 1.5": [*EXPORT, "--seed", "1.5"],
    "export --camera -1": [*EXPORT, "--camera", "-1"],
    "export --camera 99": [*EXPORT, "--camera", "99"],
    "export --conv-transpose-axis 2": [*EXPORT, "--conv-transpose-axis", "2"],
    "export --int8 --fp16": [*EXPORT, "--int8", "--fp16"],
    "export --calib without --int8": [*EXPORT, "--calib", "mine"],
    "export --data without --int8": [*EXPORT, "--data", "notes.txt"],
    "export --int8 --calib a folder of mine": [*EXPORT, "--int8", "--calib", "mine"],
    "export --int8 --data missing": [*EXPORT, "--int8", "--data", "missing.npz"],
    "export --int8 --data a text file": [*EXPORT, "--int8", "--data", "notes.txt"],
    "export -o a file": ["export", "--model", "dam.pt", "-o", "notes.txt"],
    "export -o under a file": ["export", "--model", "dam.pt", "-o", "notes.txt/b.avq"],
    "export -o someone else's folder": ["export", "--model", "dam.pt", "-o", "mine", "--force"],
    "export -o an existing bundle": ["export", "--model", "dam.pt", "-o", "b.avq"],
    "export -o the current folder": ["export", "--model", "dam.pt", "-o", ".", "--force"],
    "export -o empty": ["export", "--model", "dam.pt", "-o", "", "--force"],
    "export --model a folder": ["export", "--model", "mine", "-o", "out.avq"],
    "export --model missing": ["export", "--model", "missing.pt", "-o", "out.avq"],
    "export --capture missing": [*EXPORT, "--capture", "missing"],
    "export --capture a file": [*EXPORT, "--capture", "notes.txt"],
    # calibrate
    "calibrate --tau nan": [*CALIBRATE, "--tau", "nan"],
    "calibrate --tau inf": [*CALIBRATE, "--tau", "inf"],
    "calibrate --tau -0.1": [*CALIBRATE, "--tau", "-0.1"],
    "calibrate --tau 1": [*CALIBRATE, "--tau", "1"],
    "calibrate --temporal-weight nan": [*CALIBRATE, "--temporal-weight", "nan"],
    "calibrate --temporal-weight inf": [*CALIBRATE, "--temporal-weight", "inf"],
    "calibrate --temporal-weight -1": [*CALIBRATE, "--temporal-weight", "-1"],
    "calibrate --bits 9": [*CALIBRATE, "--bits", "9"],
    "calibrate --bits 0": [*CALIBRATE, "--bits", "0"],
    "calibrate --iters -1": [*CALIBRATE, "--iters", "-1"],
    "calibrate --iters huge": [*CALIBRATE, "--iters", str(10**12)],
    "calibrate --samples 0": [*CALIBRATE, "--samples", "0"],
    "calibrate --samples huge": [*CALIBRATE, "--samples", str(10**9)],
    "calibrate --fp16-budget -1": [*CALIBRATE, "--fp16-budget", "-1"],
    "calibrate --fp16-budget huge": [*CALIBRATE, "--fp16-budget", "1000"],
    "calibrate --precision unknown layer": [*CALIBRATE, "--precision", "dec.nope=int8"],
    "calibrate --precision int3": [*CALIBRATE, "--precision", "dec.z_fc=int3"],
    "calibrate --precision garbage": [*CALIBRATE, "--precision", "garbage"],
    "calibrate --method foo": [*CALIBRATE, "--method", "foo"],
    "calibrate --camera 99": [*CALIBRATE, "--camera", "99"],
    "calibrate --seed -1": [*CALIBRATE, "--seed", "-1"],
    "calibrate --asymmetric --bits 8 --tau nan": [*CALIBRATE, "--asymmetric", "--tau", "nan"],
    "calibrate -o a file": ["calibrate", "--model", "dam.pt", "-o", "notes.txt"],
    "calibrate -o under a file": ["calibrate", "--model", "dam.pt", "-o", "notes.txt/cal"],
    "calibrate -o someone else's folder": ["calibrate", "-m", "dam.pt", "-o", "b.avq", "--force"],
    "calibrate -o a folder with a calib.json": ["calibrate", "-m", "dam.pt", "-o", "mine"],
    "calibrate --data missing": [*CALIBRATE, "--data", "missing.npz"],
    "calibrate --capture missing": [*CALIBRATE, "--capture", "missing"],
    # build
    "build --max-batch 0": [*BUILD, "--max-batch", "0"],
    "build --max-batch huge": [*BUILD, "--max-batch", "5000"],
    "build --opt-batch 0": [*BUILD, "--opt-batch", "0"],
    "build --min-batch above max": [*BUILD, "--min-batch", "9", "--max-batch", "8"],
    "build --opt-batch above max": [*BUILD, "--opt-batch", "9"],
    "build --opt-level 9": [*BUILD, "--opt-level", "9"],
    "build --compute-capability foo": [*BUILD, "--compute-capability", "foo"],
    "build --backend foo": [*BUILD, "--backend", "foo"],
    "build --backend onnx": [*BUILD, "--backend", "onnx"],
    "build --latents missing": [*BUILD, "--latents", "missing.npz"],
    "build a file": ["build", "notes.txt"],
    "build someone else's folder": ["build", "mine"],
    # compare
    "compare --frames 1": [*COMPARE, "--frames", "1"],
    "compare --frames huge": [*COMPARE, "--frames", str(10**9)],
    "compare --batch 0": [*COMPARE, "--batch", "0"],
    "compare --batch huge": [*COMPARE, "--batch", "5000"],
    "compare --min-psnr nan": [*COMPARE, "--min-psnr", "nan"],
    "compare --min-psnr inf": [*COMPARE, "--min-psnr", "inf"],
    "compare --max-jitter nan": [*COMPARE, "--max-jitter", "nan"],
    "compare --max-jitter -1": [*COMPARE, "--max-jitter", "-1"],
    "compare --threads -1": [*COMPARE, "--threads", "-1"],
    "compare --threads huge": [*COMPARE, "--threads", str(10**6)],
    "compare --device foo": [*COMPARE, "--device", "foo"],
    "compare --reference foo": [*COMPARE, "--reference", "foo"],
    "compare --candidate foo": [*COMPARE, "--candidate", "foo"],
    "compare --seed -1": [*COMPARE, "--seed", "-1"],
    "compare --latents missing": [*COMPARE, "--latents", "missing.npz"],
    "compare --checkpoint missing": [*COMPARE, "--reference", "torch", "--checkpoint", "x.pt"],
    # bench
    "bench --iters 0": [*BENCH, "--iters", "0"],
    "bench --iters huge": [*BENCH, "--iters", str(10**12)],
    "bench --warmup -1": [*BENCH, "--warmup", "-1"],
    "bench --warmup huge": [*BENCH, "--warmup", str(10**12)],
    "bench --batch 0": [*BENCH, "--batch", "0"],
    "bench --batch huge": [*BENCH, "--batch", "5000"],
    "bench --resolution 0x0": [*BENCH, "--resolution", "0x0"],
    "bench --resolution -5x10": [*BENCH, "--resolution", "-5x10"],
    "bench --resolution huge": [*BENCH, "--resolution", "99999x99999"],
    "bench --resolution abc": [*BENCH, "--resolution", "abc"],
    "bench --resolution 10x": [*BENCH, "--resolution", "10x"],
    "bench --render foo": [*BENCH, "--render", "foo"],
    "bench --render torch without topology": [*BENCH, "--render", "torch"],
    "bench --gate nan": [*BENCH, "--gate", "psnr>=nan"],
    "bench --gate garbage": [*BENCH, "--gate", "garbage"],
    "bench --gate unknown metric": [*BENCH, "--gate", "speed>=1"],
    "bench --gate-space foo": [*BENCH, "--gate-space", "foo"],
    "bench --device foo": [*BENCH, "--device", "foo"],
    "bench --threads -1": [*BENCH, "--threads", "-1"],
    "bench --runner foo": [*BENCH, "--runner", "foo"],
    "bench --reference missing": [*BENCH, "--reference", "missing.avq"],
    "bench --checkpoint missing": [*BENCH, "--checkpoint", "missing.pt"],
    "bench --capture missing": [*BENCH, "--capture", "missing"],
    "bench --sequence a capture segment without checkpoint": [*BENCH, "--sequence", "mine:E001"],
    "bench --sequence missing": [*BENCH, "--sequence", "missing.npz"],
    "bench -o a file": ["bench", "b.avq", "-o", "notes.txt"],
    "bench -o under a file": ["bench", "b.avq", "-o", "notes.txt/rep"],
    "bench -o someone else's folder": ["bench", "b.avq", "-o", "mine"],
    "bench -o the bundle": ["bench", "b.avq", "-o", "b.avq"],
    # synth
    "synth --arch foo": [*SYNTH, "--arch", "foo"],
    "synth --iters -5": [*SYNTH, "--iters", "-5"],
    "synth --iters 0": [*SYNTH, "--iters", "0"],
    "synth --iters huge": [*SYNTH, "--iters", str(10**12)],
    "synth --texture-size 0": [*SYNTH, "--texture-size", "0"],
    "synth --texture-size 17": [*SYNTH, "--texture-size", "17"],
    "synth --texture-size huge": [*SYNTH, "--texture-size", str(2**20)],
    "synth --model-texture-size 17": [*SYNTH, "--model-texture-size", "17"],
    "synth --model-texture-size above the capture's": [
        *SYNTH,
        "--texture-size",
        "64",
        "--model-texture-size",
        "128",
    ],
    "synth --z-dim 0": [*SYNTH, "--z-dim", "0"],
    "synth --z-dim huge": [*SYNTH, "--z-dim", str(10**9)],
    "synth --seed -1": [*SYNTH, "--seed", "-1"],
    "synth into a file": ["synth", "notes.txt"],
    "synth under a file": ["synth", "notes.txt/syn"],
    "synth into someone else's folder": ["synth", "mine", "--force"],
    "synth into a bundle": ["synth", "b.avq", "--force"],
    # info, demo
    "info a folder": ["info", "mine"],
    "info a text file": ["info", "notes.txt"],
    "demo --iters 0": ["demo", "--iters", "0"],
    "demo --workdir a file": ["demo", "--workdir", "notes.txt"],
    "demo --workdir someone else's folder": ["demo", "--workdir", "mine"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_option_is_refused_in_one_line_before_any_work(name, tripwires, workspace):
    run_checked("option", CASES[name], workspace)


# --------------------------------------------------------------------------- properties

#: integer options: (command argv, option, lowest valid, highest valid)
INTEGER_OPTIONS = [
    (EXPORT, "--max-batch", 1, 4096),
    (EXPORT, "--seed", 0, 2**32 - 1),
    (CALIBRATE, "--bits", 2, 8),
    (CALIBRATE, "--samples", 1, 100_000),
    (CALIBRATE, "--iters", 0, 1_000_000),
    (BUILD, "--max-batch", 1, 4096),
    (BUILD, "--opt-level", 0, 5),
    (COMPARE, "--frames", 2, 100_000),
    (COMPARE, "--batch", 1, 4096),
    (COMPARE, "--threads", 0, 1024),
    (BENCH, "--iters", 1, 1_000_000),
    (BENCH, "--warmup", 0, 1_000_000),
    (BENCH, "--batch", 1, 4096),
    (SYNTH, "--iters", 1, 10_000_000),
    (SYNTH, "--z-dim", 1, 65_536),
]


def _invalid_integer(low: int, high: int):
    return st.one_of(
        st.integers(max_value=low - 1).map(str),
        st.integers(min_value=high + 1).map(str),
        st.sampled_from(["nan", "inf", "-inf", "1e3", "0x10", "1.5", "", " ", "½", "1_000"]),
        st.text(max_size=6).filter(lambda t: not t.strip().lstrip("+-").isdigit()),
    )


@pytest.mark.parametrize(
    "argv, option, low, high",
    INTEGER_OPTIONS,
    ids=[f"{a[0]} {o}" for a, o, _, _ in INTEGER_OPTIONS],
)
def test_any_invalid_integer_option_is_refused_in_one_line(
    argv, option, low, high, tripwires, workspace
):
    @fuzz_settings(12)
    @given(value=_invalid_integer(low, high))
    def check(value):
        run_checked("option", [*argv, option, value], workspace)

    check()


FLOAT_OPTIONS = [
    (CALIBRATE, "--tau"),
    (CALIBRATE, "--temporal-weight"),
    (COMPARE, "--min-psnr"),
    (COMPARE, "--max-jitter"),
]


@pytest.mark.parametrize(
    "argv, option", FLOAT_OPTIONS, ids=[f"{a[0]} {o}" for a, o in FLOAT_OPTIONS]
)
def test_a_non_finite_float_option_is_refused_in_one_line(argv, option, tripwires, workspace):
    @fuzz_settings(6)
    @given(value=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"]))
    def check(value):
        run_checked("option", [*argv, option, value], workspace)

    check()
