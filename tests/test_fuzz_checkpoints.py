"""Fuzz: malformed checkpoints given to `avatarq info` and `avatarq export` (see fuzz_oracle).

A checkpoint is untrusted input: any bytes, any pickle, any tensors. Each is either loaded
as the DAM it describes or refused with one line naming the file (and the tensor), before
any large allocation and without running code from the file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel
from avatarq.models.checkpoint import load_checkpoint
from fuzz_oracle import assert_untouched, call, fuzz_settings, run_checked, snapshot

TINY = DAMConfig(z_dim=4, tex_size=16, n_vertices=6, n_cams=2, has_encoder=False)


def tiny_state() -> dict[str, torch.Tensor]:
    """A valid bare state_dict (z 4, texture 16, 6 vertices), seeded."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in DeepAppearanceModel(TINY).state_dict().items()}


def saved(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def with_entry(key: str, value) -> dict:
    state = tiny_state()
    state[key] = value
    return state


def like(key: str, dtype: torch.dtype = torch.float32, fill: float = 0.0) -> torch.Tensor:
    """A tensor of ``key``'s shape in the valid tiny state_dict."""
    return torch.full(tiny_state()[key].shape, fill).to(dtype)


class _Pwn:
    """Unpickling this would create a file: a checkpoint must never run code."""

    def __reduce__(self):
        return (Path("pwned").touch, ())


Z_FC = "dec.z_fc.weight"
MESH_FC = "dec.mesh_fc.weight"
HUGE_Z = 2**20  # texture_fc [16 z, z] of 64 TB, stored as a 4-byte stride-0 view

CURATED: dict[str, Callable[[], bytes | None]] = {
    "empty file": lambda: b"",
    "text file": lambda: b"not a checkpoint\n",
    "binary text, invalid UTF-8": lambda: bytes(range(256)) * 4,
    "zip header only": lambda: b"PK\x03\x04" + bytes(26),
    "a zip of text": lambda: _zip_of_text(),
    "pickle protocol byte then garbage": lambda: b"\x80\x04garbage",
    "pickle that runs code": lambda: pickle.dumps(_Pwn(), protocol=2),
    "torch.save of an object": lambda: saved({"model": _Pwn()}),
    "a list of tensors": lambda: saved([torch.zeros(2)]),
    "a bare tensor": lambda: saved(torch.zeros(2)),
    "an empty dict": lambda: saved({}),
    "state_dict that is an int": lambda: saved({"state_dict": 5}),
    "non-string key": lambda: saved({**tiny_state(), 7: torch.zeros(1)}),
    "tuple key": lambda: saved({("dec", 1): torch.zeros(1), **tiny_state()}),
    "only non-string keys": lambda: saved({1: torch.zeros(1), 2: torch.zeros(1)}),
    "None value": lambda: saved(with_entry(Z_FC, None)),
    "string value": lambda: saved(with_entry(Z_FC, "weights")),
    "zero-size latent": lambda: saved(with_entry(Z_FC, torch.zeros(256, 0))),
    "zero-size mesh": lambda: saved(with_entry(MESH_FC, torch.zeros(0, 4))),
    "mesh size not a multiple of 3": lambda: saved(with_entry(MESH_FC, torch.zeros(17, 4))),
    "absurd latent size (64 TB from a stride-0 view)": lambda: saved(_absurd_state()),
    "absurd vertex count": lambda: saved(
        with_entry(MESH_FC, torch.zeros(1, 1).expand(3 * 10**11, 4))
    ),
    "complex weight": lambda: saved(with_entry(Z_FC, like(Z_FC, torch.complex64))),
    "bool weight": lambda: saved(with_entry(Z_FC, like(Z_FC, torch.bool))),
    "integer weight": lambda: saved(with_entry(Z_FC, like(Z_FC, torch.int64))),
    "sparse weight": lambda: saved(with_entry(Z_FC, like(Z_FC).to_sparse())),
    "NaN weight": lambda: saved(with_entry(Z_FC, like(Z_FC, fill=float("nan")))),
    "Inf weight": lambda: saved(with_entry(MESH_FC, like(MESH_FC, fill=float("inf")))),
    "-Inf bias": lambda: saved(with_entry("dec.mesh_fc.bias", torch.full((18,), -float("inf")))),
    "transposed weight": lambda: saved(with_entry(MESH_FC, torch.zeros(256, 18))),
    "unexpected key": lambda: saved(with_entry("dec.extra.weight", torch.zeros(1))),
    "missing key": lambda: saved({k: v for k, v in tiny_state().items() if k != "cc.bias"}),
    "half the keys prefixed": lambda: saved(
        {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(tiny_state().items())}
    ),
    "legacy format truncated": lambda: saved(tiny_state(), legacy=True)[:3000],
    "a directory": lambda: None,
}
TRUNCATIONS = (1, 2, 4, 30, 100, 1000, 20_000, -100, -22, -1)


def _zip_of_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data.pkl", "hello")
    return buf.getvalue()


def _absurd_state() -> dict:
    state = tiny_state()
    state[Z_FC] = torch.zeros(1, 1).expand(256, HUGE_Z)
    state["dec.texture_fc.weight"] = torch.zeros(1, 1).expand(16 * HUGE_Z, HUGE_Z)
    return state


def write(path: Path, content: bytes | None) -> Path:
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name", list(CURATED))
@pytest.mark.parametrize("command", ["info", "export"])
def test_a_malformed_checkpoint_is_one_line_and_writes_nothing(name, command, tmp_path):
    ckpt = write(tmp_path / "dam.pt", CURATED[name]())
    argv = ["info", ckpt] if command == "info" else ["export", "--model", ckpt, "-o", "out.avq"]
    outcome = run_checked("checkpoint", argv, tmp_path)
    assert "dam.pt" in outcome.error


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_a_truncated_checkpoint_is_refused(cut, tmp_path):
    data = saved({"module." + k: v for k, v in tiny_state().items()})
    ckpt = write(tmp_path / "dam.pt", data[:cut])
    outcome = run_checked("checkpoint", ["info", ckpt], tmp_path)
    assert "dam.pt" in outcome.error


def test_an_absurd_size_fails_fast_naming_the_tensor(tmp_path):
    ckpt = write(tmp_path / "dam.pt", saved(_absurd_state()))
    assert ckpt.stat().st_size < 200_000
    outcome = run_checked("checkpoint", ["info", ckpt], tmp_path)
    assert "dec.z_fc.weight" in outcome.error or "dec.texture_fc.weight" in outcome.error


def test_the_valid_tiny_checkpoint_loads(tmp_path):
    ckpt = write(tmp_path / "dam.pt", saved({"module." + k: v for k, v in tiny_state().items()}))
    outcome = run_checked("checkpoint", ["info", ckpt], tmp_path, expect=0)
    assert "arch base" in outcome.out


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder each generated input is written into (the file is overwritten each time)."""
    return tmp_path_factory.mktemp("scratch")


PREFIXES = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x02\x8a\x0a"])


@fuzz_settings(60)
@given(prefix=PREFIXES, body=st.binary(max_size=512))
def test_any_bytes_load_or_fail_with_one_line(prefix, body, scratch):
    folder = scratch
    ckpt = write(folder / "dam.pt", prefix + body)
    before = snapshot(folder)
    result = call("checkpoint", load_checkpoint, ckpt)
    assert isinstance(result, AvatarqError)
    assert_untouched(before, folder)


@fuzz_settings(60)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4
    )
)
def test_a_corrupted_checkpoint_loads_or_fails_with_one_line(edits, scratch):
    data = bytearray(saved({"module." + k: v for k, v in tiny_state().items()}))
    for offset, patch in edits:
        at = offset % len(data)
        data[at : at + len(patch)] = patch
    folder = scratch
    result = call("checkpoint", load_checkpoint, write(folder / "dam.pt", bytes(data)))
    if not isinstance(result, AvatarqError):
        for p in result.parameters():
            assert torch.isfinite(p).all()


DTYPES = st.sampled_from(
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ]
)
FILLS = st.sampled_from(["zeros", "randn", "nan", "inf", "-inf", "huge"])


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 6), max_size=4))
    dtype = draw(DTYPES)
    t = torch.randn(shape) * 0.1
    fill = draw(FILLS)
    if fill != "randn" and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = {
            "zeros": 0.0,
            "nan": float("nan"),
            "inf": float("inf"),
            "-inf": -float("inf"),
            "huge": 3e38,
        }[fill]
    if dtype.is_complex:
        t = t.to(dtype)
    else:
        t = t.to(dtype)
    layout = draw(st.sampled_from(["dense", "dense", "sparse", "stride-0"]))
    if layout == "sparse" and t.ndim >= 1 and not dtype.is_complex:
        t = t.to_sparse()
    elif layout == "stride-0":
        t = torch.zeros(1, dtype=dtype).expand(draw(st.sampled_from([2**40, 7, 2**33])))
    return t


KEYS = sorted(tiny_state())


@fuzz_settings(100)
@given(
    replace=st.dictionaries(st.sampled_from(KEYS), tensors(), max_size=2),
    drop=st.lists(st.sampled_from(KEYS), max_size=1),
    extra=st.dictionaries(
        st.one_of(st.text(max_size=12), st.integers(), st.sampled_from(KEYS)), tensors(), max_size=1
    ),
    prefix=st.sampled_from(["", "module."]),
)
def test_any_state_dict_loads_or_fails_with_one_line(replace, drop, extra, prefix, scratch):
    state = {**tiny_state(), **replace}
    for key in drop:
        state.pop(key, None)
    state = {(prefix + k if isinstance(k, str) else k): v for k, v in {**state, **extra}.items()}
    folder = scratch
    result = call("checkpoint", load_checkpoint, write(folder / "dam.pt", saved(state)))
    if not isinstance(result, AvatarqError):
        for p in result.parameters():
            assert torch.isfinite(p).all()
