"""Low-bit bundles through the engine builders on the CPU: ONNX Runtime builds every format
(exact to model.onnx), TensorRT-RTX builds INT4 and FP8 graphs and refuses block scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avatarq.calibration import CalibrationConfig
from avatarq.calibration.from_files import calibrate_decoder
from avatarq.core.inputs import DecoderInputs
from avatarq.data.latents import save_inputs
from avatarq.engines import BuildOptions, build_engine
from avatarq.errors import AvatarqError
from avatarq.export import ExportOptions, export_bundle
from avatarq.models import load_checkpoint
from tiny_dam import export_tiny_dam


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lowbit_engines")
    _, checkpoint = export_tiny_dam(root, "fp32.avq")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((12, 16)).astype(np.float32)
    save_inputs(
        DecoderInputs.from_z_view(z, np.tile(np.float32([[0, 0, 1]]), (12, 1))), root / "lat.npz"
    )
    return root, checkpoint


def _bundle(tiny, name: str, **settings) -> Path:
    root, checkpoint = tiny
    out = root / f"{name}.avq"
    if out.exists():
        return out
    config = CalibrationConfig(iters=2, crop=8, sensitivity="none", **settings)
    _, artifact = calibrate_decoder(
        load_checkpoint(checkpoint), str(root / "lat.npz"), None, config, 8, None, None
    )
    artifact.save(root / f"calib_{name}")
    export_bundle(
        checkpoint, out, options=ExportOptions(int8=True, calib=str(root / f"calib_{name}"))
    )
    return out


@pytest.mark.parametrize(
    "name, settings",
    [
        ("w4a8", {"bits": "w4a8"}),
        ("w4a4_gptq", {"bits": "w4a4", "gptq": True}),
        ("fp8", {"bits": "fp8"}),
        ("w8a8_blocks", {"bits": "w8a8", "weight_block": 32}),
        ("w4a8_rotated", {"bits": "w4a8", "hadamard": True}),
    ],
)
def test_onnxruntime_builds_every_format_exact_to_model_onnx(tiny, name, settings):
    bundle = _bundle(tiny, name, **settings)
    check = build_engine(bundle, "onnxruntime").check
    assert check.texture_max_abs_error < 1e-4 * check.peak


trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")


@pytest.mark.parametrize(
    "name, settings, weight_type",
    [("w4a8", {"bits": "w4a8"}, "INT4"), ("fp8", {"bits": "fp8"}, "FP8")],
)
def test_tensorrt_rtx_builds_int4_and_fp8_graphs_on_the_cpu(tiny, name, settings, weight_type):
    bundle = _bundle(tiny, name, **settings)
    record = build_engine(bundle, "tensorrt-rtx", BuildOptions(max_batch=2))
    layers = json.loads((bundle / record.layers).read_text())
    weights = [entry for entry in layers if entry["name"].endswith(".weight_quantized")]
    assert weights and {entry["outputs"][0] for entry in weights} == {weight_type}


def test_tensorrt_rtx_refuses_block_scales_with_one_line(tiny):
    bundle = _bundle(tiny, "w8a8_blocks", bits="w8a8", weight_block=32)
    with pytest.raises(AvatarqError) as info:
        build_engine(bundle, "tensorrt-rtx", BuildOptions(max_batch=2))
    assert "TensorRT-RTX" in str(info.value) and "\n" not in str(info.value)
