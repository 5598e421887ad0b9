"""The runner interface, build/run options and the backend registry."""

import json
import subprocess
import sys

import numpy as np
import pytest

from avatarq.core.documents import dump_document, parse_document
from avatarq.engines import (
    BACKENDS,
    BuildOptions,
    Runner,
    RunOptions,
    available_backends,
    get_backend,
)
from avatarq.errors import AvatarqError
from avatarq.export.bundle import TensorSpec

INPUTS = [
    TensorSpec("z", "float32", ["batch", 4], "latent"),
    TensorSpec("view", "float32", ["batch", 3], "view"),
]
OUTPUTS = [
    TensorSpec("texture", "float32", ["batch", 3, 2, 2], "texture"),
    TensorSpec("vertices", "float32", ["batch", 5, 3], "vertices"),
]


class SumRunner(Runner):
    """texture = sum(z) everywhere, vertices = view repeated: easy to check."""

    backend = "sum"

    def __init__(self, max_batch=4):
        super().__init__(INPUTS, OUTPUTS, max_batch)
        self.events = []

    def _activate(self):
        self.events.append("activate")

    def _deactivate(self):
        self.events.append("deactivate")

    def _run(self, inputs, outputs, batch):
        outputs["texture"][...] = inputs["z"].sum(1)[:, None, None, None]
        outputs["vertices"][...] = inputs["view"][:, None, :]


def _inputs(batch=2, z_dim=4):
    z = np.arange(batch * z_dim, dtype=np.float32).reshape(batch, z_dim)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (batch, 1))
    return z, view


def test_decode_returns_outputs_of_the_declared_shapes():
    with SumRunner() as runner:
        texture, vertices = runner.decode(*_inputs(2))
    assert texture.shape == (2, 3, 2, 2) and vertices.shape == (2, 5, 3)
    assert texture[1, 0, 0, 0] == 4 + 5 + 6 + 7
    assert np.array_equal(vertices[0, 4], [0.0, 0.0, 1.0])


def test_outputs_are_views_of_one_preallocated_buffer_for_every_batch():
    with SumRunner() as runner:
        first, _ = runner.decode(*_inputs(1))
        second, _ = runner.decode(*_inputs(3))
        assert np.shares_memory(first, second)
        assert first.base is second.base


def test_each_call_is_timed():
    with SumRunner() as runner:
        assert runner.last_inference_ms is None
        for _ in range(3):
            runner.decode(*_inputs(1))
        assert len(runner.timings_ms) == 3
        assert runner.last_inference_ms == runner.timings_ms[-1] >= 0.0


def test_context_manager_activates_once_and_deactivates():
    runner = SumRunner()
    with runner:
        runner.activate()
        assert runner.is_active
    assert runner.events == ["activate", "deactivate"]
    assert not runner.is_active


def test_inactive_runner_refuses_to_run():
    with pytest.raises(AvatarqError, match="not active"):
        SumRunner().decode(*_inputs(1))


@pytest.mark.parametrize(
    "z, view, message",
    [
        (
            np.zeros((1, 4), np.float64),
            np.zeros((1, 3), np.float32),
            "input z must be float32, got float64",
        ),
        (
            np.zeros((1, 5), np.float32),
            np.zeros((1, 3), np.float32),
            r"input z must have shape \[batch, 4\], got \[1, 5\]",
        ),
        (
            np.zeros(4, np.float32),
            np.zeros((1, 3), np.float32),
            r"input z must have shape \[batch, 4\], got \[4\]",
        ),
        (np.zeros((2, 4), np.float32), np.zeros((1, 3), np.float32), "disagree on the batch size"),
        (np.zeros((5, 4), np.float32), np.zeros((5, 3), np.float32), "batch size must be 1..4"),
        (np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32), "batch size must be 1..4"),
        ([[0.0] * 4], np.zeros((1, 3), np.float32), "must be a numpy array"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(z, view, message):
    with SumRunner() as runner, pytest.raises(AvatarqError, match=message) as info:
        runner.decode(z, view)
    assert "\n" not in str(info.value)


def test_infer_rejects_missing_or_extra_names():
    z, view = _inputs(1)
    with SumRunner() as runner, pytest.raises(AvatarqError, match="exactly z, view"):
        runner.infer({"z": z, "latent": view})


def test_non_contiguous_inputs_are_accepted():
    z, view = _inputs(2, z_dim=8)
    with SumRunner() as runner:
        texture, _ = runner.decode(z[:, ::2], view)
    assert texture[1, 0, 0, 0] == 8 + 10 + 12 + 14


def test_build_options_round_trip_through_json():
    options = BuildOptions(max_batch=16, opt_batch=4, compute_capabilities=("SM86", "sm89"))
    assert options.compute_capabilities == ("sm86", "sm89")
    text = dump_document(options)
    assert parse_document(text, BuildOptions, "options") == options


def test_run_options_round_trip_through_json():
    options = RunOptions(device="cpu", threads=2, checkpoint="dam.pt", fp16=True)
    assert RunOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
        ({"max_batch": 0}, "max_batch must be an integer >= 1"),
        ({"optimization_level": 6}, "0..5"),
        ({"compute_capabilities": ("86",)}, "like sm86"),
        ({"version": 2}, "version 2"),
        ({"unknown": 1}, "unknown: unknown field"),
        ({"max_batch": "8"}, "max_batch: input should be a valid integer"),
    ],
)
def test_build_options_reject_bad_values(kwargs, message):
    with pytest.raises(AvatarqError, match=message):
        parse_document(json.dumps(kwargs), BuildOptions, "options")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "gpu"}, "device must be one of"),
        ({"threads": -1}, "threads"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_run_options_reject_bad_values(kwargs, message):
    with pytest.raises(AvatarqError, match=message):
        RunOptions(**kwargs)


def test_registry_names_every_backend_once():
    assert list(BACKENDS) == ["onnxruntime", "onnx", "tensorrt", "tensorrt-rtx", "torch"]


def test_cpu_backends_are_always_available():
    assert {"onnxruntime", "onnx", "torch"} <= set(available_backends())


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(AvatarqError, match="expected one of onnxruntime, onnx, tensorrt"):
        get_backend("tensorflow")


def test_torch_backend_has_nothing_to_build():
    with pytest.raises(AvatarqError, match="runs without an engine"):
        get_backend("torch").builder_class()


def test_importing_engines_loads_no_backend_library():
    code = (
        "import sys, avatarq.engines, avatarq.runtime; "
        "print(','.join(m for m in ('tensorrt', 'tensorrt_rtx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
