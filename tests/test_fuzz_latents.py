"""Fuzz: malformed latent files (.npz of z, view and labels) given to every command that
reads one: compare --latents, build --latents, calibrate --data, bench --sequence (see
fuzz_oracle). Any arrays, dtypes, shapes and values; any bytes; archives whose headers lie.
"""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from avatarq.bench.sequences import load_sequence
from avatarq.data.latents import load_inputs
from avatarq.errors import AvatarqError
from fuzz_oracle import assert_untouched, call, fuzz_settings, run_checked, snapshot

Z = 4  # the fuzz bundle's latent size


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_member(header: dict, data: bytes) -> bytes:
    """A .npy 1.0 member whose header says ``header`` and whose data is ``data``."""
    text = repr(header).encode("latin1")
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def zip_of(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def clip(t: int = 8, z_dim: int = Z) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    view = rng.normal(size=(t, 3)) * 0.2 + [0, 0, 1]
    return {"z": rng.normal(size=(t, z_dim)), "view": view / np.linalg.norm(view, axis=1)[:, None]}


HUGE = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)}
CURATED: dict[str, bytes | None] = {
    "empty file": b"",
    "binary junk": bytes(range(256)) * 4,
    "a single .npy": npy_member(
        {"descr": "<f4", "fortran_order": False, "shape": (2, 4)}, bytes(32)
    ),
    "a zip of text": zip_of(**{"z.txt": b"1 2 3"}),
    "a zip header only": b"PK\x03\x04" + bytes(26),
    "a header claiming 4 TB": zip_of(**{"z.npy": npy_member(HUGE, bytes(64)), "view.npy": b""}),
    "a header with a bad dtype": zip_of(
        **{"z.npy": npy_member({"descr": "<x9", "fortran_order": False, "shape": (2,)}, b"")}
    ),
    "a header that is not a dict": zip_of(**{"z.npy": b"\x93NUMPY\x01\x00\x04\x00[1]\n"}),
    "npy version 9": zip_of(**{"z.npy": b"\x93NUMPY\x09\x00" + bytes(60)}),
    "pickled objects": npz(z=np.array([{"a": 1}, None], dtype=object), view=np.zeros((2, 3))),
    "no arrays": npz(),
    "z without view": npz(z=np.zeros((4, Z))),
    "view without z": npz(view=np.zeros((4, 3))),
    "a scalar z": npz(z=np.float32(1), view=np.zeros((1, 3))),
    "zero steps": npz(z=np.zeros((0, Z)), view=np.zeros((0, 3))),
    "one step": npz(**clip(1)),
    "steps that disagree": npz(z=np.zeros((5, Z)), view=np.zeros((4, 3))),
    "another latent size": npz(**clip(8, Z + 3)),
    "a 3-d z": npz(z=np.zeros((4, Z, 2)), view=np.zeros((4, 3))),
    "view of 2 numbers": npz(z=np.zeros((4, Z)), view=np.zeros((4, 2))),
    "NaN in z": npz(**{**clip(), "z": np.full((8, Z), np.nan)}),
    "+Inf in view": npz(**{**clip(), "view": np.full((8, 3), np.inf)}),
    "-Inf in z": npz(**{**clip(), "z": np.full((8, Z), -np.inf)}),
    "beyond float32": npz(**{**clip(), "z": np.full((8, Z), 1e300)}),
    "complex z": npz(**{**clip(), "z": np.zeros((8, Z), np.complex64)}),
    "boolean z": npz(**{**clip(), "z": np.zeros((8, Z), bool)}),
    "string z": npz(**{**clip(), "z": np.array([["a"] * Z] * 8)}),
    "datetime z": npz(**{**clip(), "z": np.zeros((8, Z), "datetime64[s]")}),
    "labels of the wrong length": npz(**clip(), segment=np.array(["s"] * 3)),
    "2-d labels": npz(**clip(), camera=np.array([["c"]] * 8)),
    "a directory": None,
}


def write(path: Path, content: bytes | None) -> Path:
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def read_latents(path: Path):
    """What compare/build (load_inputs) and bench (load_sequence) make of the file."""
    inputs = load_inputs(path)
    load_sequence(str(path), Z)
    return inputs


@pytest.mark.parametrize("name", list(CURATED))
def test_a_malformed_latent_file_is_refused_in_one_line(name, tmp_path):
    path = write(tmp_path / "latents.npz", CURATED[name])
    before = snapshot(tmp_path)
    result = call("latent file", read_latents, path)
    assert isinstance(result, AvatarqError) and "latents.npz" in str(result)
    assert_untouched(before, tmp_path)


COMMANDS = {
    "compare": lambda bundle, ckpt: ["compare", bundle, "--latents", "latents.npz"],
    "build": lambda bundle, ckpt: ["build", bundle, "--latents", "latents.npz"],
    "bench": lambda bundle, ckpt: ["bench", bundle, "--sequence", "latents.npz", "-o", "rep"],
    "calibrate": lambda bundle, ckpt: ["calibrate", "-m", ckpt, "--data", "latents.npz", "-o", "c"],
}
CLI_CASES = [
    "binary junk",
    "a header claiming 4 TB",
    "pickled objects",
    "one step",
    "another latent size",
    "NaN in z",
    "beyond float32",
    "a directory",
]


@pytest.mark.parametrize("name", CLI_CASES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_malformed_latent_file(command, name, fuzz_bundle, tmp_path):
    if name == "one step" and command in ("build", "calibrate"):
        pytest.skip("a single step is a valid latent file for these")
    shutil.copy(fuzz_bundle[0], tmp_path / "dam.pt")
    shutil.copytree(fuzz_bundle[1], tmp_path / "b.avq")
    write(tmp_path / "latents.npz", CURATED[name])
    outcome = run_checked("latent file", COMMANDS[command]("b.avq", "dam.pt"), tmp_path)
    assert "latents.npz" in outcome.error or "latent" in outcome.error


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder each generated input is written into (the file is overwritten each time)."""
    return tmp_path_factory.mktemp("scratch")


NAMES = st.sampled_from(["z", "view", "segment", "frame", "camera", "expression", "z_2"])
DTYPES = st.one_of(
    hnp.floating_dtypes(),
    hnp.integer_dtypes(),
    hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(max_len=4),
    hnp.datetime64_dtypes(),
)
ARRAYS = DTYPES.flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    )
)


@fuzz_settings(150)
@given(arrays=st.dictionaries(NAMES, ARRAYS, max_size=5), base=st.booleans())
def test_any_arrays_load_or_fail_with_one_line(arrays, base, scratch):
    folder = scratch
    content = {**(clip() if base else {}), **arrays}
    path = write(folder / "latents.npz", npz(**content))
    result = call("latent file", read_latents, path)
    if not isinstance(result, AvatarqError):
        assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in result.arrays.values())


@fuzz_settings(60)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**5), st.binary(min_size=1, max_size=6)), min_size=1, max_size=3
    )
)
def test_a_corrupted_latent_file_loads_or_fails_with_one_line(edits, scratch):
    data = bytearray(npz(**clip(), segment=np.array(["s"] * 8)))
    for offset, patch in edits:
        at = offset % len(data)
        data[at : at + len(patch)] = patch
    folder = scratch
    call("latent file", read_latents, write(folder / "latents.npz", bytes(data)))
