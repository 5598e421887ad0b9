"""Fuzz: NaN and infinities anywhere (see fuzz_oracle). Python's ``max()`` drops NaN and
``nan < x`` is False, so a NaN slips through every check written as a comparison; each
must instead be an error naming the tensor: in a latent, a weight, a scale (see also
test_fuzz_calibration), and in a decoder's output during validation, build checks,
compare and bench.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch

from fuzz_oracle import run_checked

NON_FINITE = {"NaN": float("nan"), "+Inf": float("inf"), "-Inf": -float("inf")}


def _latents(name: str, value: float) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"z": rng.normal(size=(6, 4)), "view": np.tile([0.0, 0.0, 1.0], (6, 1))}
    arrays[name][3, 1 if name == "z" else 2] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("value", list(NON_FINITE))
@pytest.mark.parametrize("array", ["z", "view"])
@pytest.mark.parametrize("command", ["compare", "bench"])
def test_a_non_finite_latent_is_an_error_naming_it(command, array, value, fuzz_bundle, tmp_path):
    shutil.copytree(fuzz_bundle[1], tmp_path / "b.avq")
    (tmp_path / "z.npz").write_bytes(_latents(array, NON_FINITE[value]))
    flag = "--latents" if command == "compare" else "--sequence"
    outcome = run_checked("non-finite", [command, "b.avq", flag, "z.npz"], tmp_path)
    assert f"input {array} holds NaN or infinite values" in outcome.error


def _state(fuzz_bundle, key: str, value: float) -> dict:
    from avatarq.models.checkpoint import read_state_dict

    state = read_state_dict(fuzz_bundle[0])
    state[key].view(-1)[0] = value
    return state


WEIGHTS = ["module.dec.z_fc.weight", "module.dec.texture_fc.bias", "module.cc.weight"]


@pytest.mark.parametrize("value", list(NON_FINITE))
@pytest.mark.parametrize("key", WEIGHTS)
def test_a_non_finite_weight_is_an_error_naming_it(key, value, fuzz_bundle, tmp_path):
    torch.save(_state(fuzz_bundle, key, NON_FINITE[value]), tmp_path / "dam.pt")
    outcome = run_checked("non-finite", ["export", "--model", "dam.pt", "-o", "b.avq"], tmp_path)
    assert f"tensor {key.removeprefix('module.')!r} holds NaN or infinite values" in outcome.error


@pytest.fixture(scope="module")
def overflowing(fuzz_bundle, tmp_path_factory):
    """(dam.pt with finite weights whose texture overflows float32, its unvalidated bundle)."""
    from avatarq.export import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("overflow")
    state = _state(fuzz_bundle, "module.dec.z_fc.weight", 0.0)
    for part in ("bias", "deconv.bias"):  # two finite biases whose sum overflows float32
        state[f"module.dec.texture_decoder.upsample.0.conv2.{part}"].fill_(3e38)
    torch.save(state, folder / "dam.pt")
    export_bundle(folder / "dam.pt", folder / "b.avq", options=ExportOptions(validate=False))
    return folder / "dam.pt", folder / "b.avq"


COMMANDS = {
    "export (validation)": ["export", "--model", "dam.pt", "-o", "new.avq"],
    "build (engine check)": ["build", "b.avq", "--no-rewrite"],
    "compare": ["compare", "b.avq", "--frames", "4"],
    "bench": ["bench", "b.avq", "--iters", "1", "--warmup", "0", "-o", "rep"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_non_finite_decoder_output_is_an_error_naming_it(command, overflowing, tmp_path):
    shutil.copy(overflowing[0], tmp_path / "dam.pt")
    shutil.copytree(overflowing[1], tmp_path / "b.avq")
    outcome = run_checked("non-finite", COMMANDS[command], tmp_path)
    assert "output texture holds NaN or infinite values" in outcome.error
