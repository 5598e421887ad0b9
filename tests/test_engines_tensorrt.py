"""TensorRT / TensorRT-RTX: real TensorRT-RTX engines built on the CPU, runner checks, and
GPU runs where a supported GPU exists."""

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from avatarq.engines import BuildOptions, RunOptions, build_engine, get_backend, open_runner
from avatarq.errors import AvatarqError
from avatarq.export import open_bundle
from avatarq.export.rewrite_ort import default_calibration_feeds

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")

from avatarq.engines.tensorrt_rtx import TensorRTRTXRunner, runs_on  # noqa: E402
from tiny_dam import export_tiny_dam, repin_graph  # noqa: E402


def quantize(model_path, out_path, quantize_bias=False):
    """Q/DQ placed as avatarq does: int8 symmetric per-tensor activations on the inputs of
    ConvTranspose/Gemm, int8 per-output-channel weights, no Q/DQ on their outputs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = default_calibration_feeds(onnx.load(str(model_path)), 8, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(8)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(model_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["ConvTranspose", "Gemm"],
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": quantize_bias,
            "OpTypesToExcludeOutputQuantization": ["ConvTranspose", "Gemm"],
        },
    )


def int8_copy(bundle, dst, quantize_bias=False):
    """A copy of ``bundle`` whose model.onnx carries INT8 Q/DQ."""
    shutil.copytree(bundle, dst)
    quantize(bundle / "model.onnx", dst / "model.onnx", quantize_bias)
    return repin_graph(dst)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    export_tiny_dam(root, "fp32.avq")
    return int8_copy(root / "fp32.avq", root / "int8.avq")


@pytest.fixture
def bundle(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "dam.avq")


def calibrated_int8_copy(avatar, bundle, dst):
    """``bundle`` with model.onnx replaced by avatarq's own INT8 Q/DQ graph (max calibration
    on the capture, `avatarq.export.qdq.quantize_onnx`)."""
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_capture
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization
    from avatarq.export.qdq import quantize_onnx
    from avatarq.models import DeployableDecoder, load_checkpoint

    model = load_checkpoint(avatar.checkpoint)
    capture = MultifaceCapture(avatar.capture_root)
    decoder = DeployableDecoder(model, capture_normalization(capture))
    samples = samples_from_capture(model, capture, n_random=8, n_clips=1, clip_length=4)
    artifact = calibrate(decoder, samples, CalibrationConfig(method="max"))
    shutil.copytree(bundle, dst)
    onnx.save(quantize_onnx(onnx.load(str(bundle / "model.onnx")), artifact), dst / "model.onnx")
    return repin_graph(dst)


def test_builds_a_real_engine_from_the_synthetic_dam_int8_onnx_on_the_cpu(
    small_avatar, small_bundle, tmp_path
):
    bundle = calibrated_int8_copy(small_avatar, small_bundle, tmp_path / "dam_int8.avq")
    record = build_engine(bundle, "tensorrt-rtx", BuildOptions(max_batch=4))
    manifest = open_bundle(bundle).manifest
    engine = bundle / record.path
    data = engine.read_bytes()
    int8_weight_bytes = sum(
        i.ByteSize()
        for i in onnx.load(str(bundle / "model.onnx")).graph.initializer
        if i.data_type == onnx.TensorProto.INT8
    )
    assert (record.backend, record.target, record.path) == (
        "tensorrt-rtx",
        "ampere+",
        "engines/tensorrt-rtx-ampere+.engine",
    )
    assert record.library_version == trt.__version__
    assert len(data) == record.size_bytes > int8_weight_bytes
    # The serialized engine names its I/O tensors; shapes come from the parsed network.
    assert b"texture" in data and b"vertices" in data
    io = record.io
    for spec in manifest.inputs + manifest.outputs:
        assert io[spec.name]["shape"] == [-1 if d == "batch" else d for d in spec.shape]
    assert [e.backend for e in manifest.engines] == ["tensorrt-rtx"]


def test_layer_types_show_the_int8_plan(bundle):
    record = build_engine(bundle, "tensorrt-rtx")
    layers = json.loads((bundle / record.layers).read_text())
    quantize_outputs = {
        t for layer in layers if layer["type"] == "QUANTIZE" for t in layer["outputs"]
    }
    assert quantize_outputs == {"INT8"}
    assert sum(layer["type"] == "DECONVOLUTION" for layer in layers) == 4
    assert record.strongly_typed is True


def test_optimization_profile_and_level_are_recorded(bundle):
    options = BuildOptions(min_batch=1, opt_batch=2, max_batch=6, optimization_level=1)
    recorded = build_engine(bundle, "tensorrt-rtx", options).options
    assert (recorded.min_batch, recorded.opt_batch, recorded.max_batch) == (1, 2, 6)
    assert recorded.optimization_level == 1


def test_rtx_keeps_no_timing_cache(bundle):
    # Timing caches are no-ops in TensorRT-RTX; its runner keeps a runtime cache instead.
    record = build_engine(bundle, "tensorrt-rtx")
    assert record.timing_cache is None
    assert not list((bundle / "engines").glob("*.timing-cache"))


def test_explicit_compute_capabilities_name_the_engine(bundle):
    record = build_engine(
        bundle, "tensorrt-rtx", BuildOptions(compute_capabilities=("sm86", "sm89"))
    )
    assert (record.target, record.path) == ("sm86+sm89", "engines/tensorrt-rtx-sm86+sm89.engine")


def test_unknown_compute_capability_lists_the_known_ones(bundle):
    with pytest.raises(AvatarqError, match=r"cannot target sm90; it knows .*sm86"):
        build_engine(bundle, "tensorrt-rtx", BuildOptions(compute_capabilities=("sm90",)))


def test_parser_error_names_the_onnx_node(tiny, tmp_path):
    # quantize_static's int32 bias DequantizeLinear is not TensorRT-legal.
    bundle = shutil.copytree(tiny, tmp_path / "bad.avq")
    quantize(tiny.parent / "fp32.avq" / "model.onnx", bundle / "model.onnx", quantize_bias=True)
    repin_graph(bundle)
    with pytest.raises(
        AvatarqError,
        match=r"cannot parse model.onnx: node '.*bias.*' \(DequantizeLinear\): .*Int32",
    ) as info:
        build_engine(bundle, "tensorrt-rtx")
    assert "\n" not in str(info.value)


def test_runner_refuses_a_bundle_without_the_engine(bundle):
    build_engine(bundle, "onnxruntime")
    with pytest.raises(
        AvatarqError, match=r"has no TensorRT-RTX engine \(engines built: onnxruntime\)"
    ):
        open_runner(bundle, "tensorrt-rtx")


def test_runner_refuses_an_engine_of_another_version(bundle):
    build_engine(bundle, "tensorrt-rtx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engines"][0]["library_version"] = "0.9.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        AvatarqError, match=f"built with TensorRT-RTX 0.9.0; this machine has {trt.__version__}"
    ):
        open_runner(bundle, "tensorrt-rtx")


def test_runner_refuses_a_corrupt_engine_file(bundle):
    record = build_engine(bundle, "tensorrt-rtx")
    (bundle / record.path).write_bytes(b"\0" * 64)
    with pytest.raises(AvatarqError, match="is corrupt"):
        open_runner(bundle, "tensorrt-rtx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_runner_without_a_gpu_says_so(bundle):
    build_engine(bundle, "tensorrt-rtx")
    with pytest.raises(AvatarqError, match="run on a CUDA GPU, and torch sees none"):
        open_runner(bundle, "tensorrt-rtx").activate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_auto_passes_over_an_rtx_engine_it_cannot_run_here(bundle):
    from avatarq.engines import resolve_backend

    build_engine(bundle, "tensorrt-rtx")
    build_engine(bundle, "onnxruntime")
    assert resolve_backend(open_bundle(bundle), "auto") == "onnxruntime"


@pytest.mark.parametrize(
    "target, capability, runs",
    [
        ("ampere+", (8, 6), True),
        ("ampere+", (8, 0), True),
        ("ampere+", (12, 0), True),
        ("ampere+", (7, 5), False),
        ("ampere+", (9, 0), False),
        ("sm75", (7, 5), True),
        ("sm86+sm89", (8, 9), True),
        ("sm86+sm89", (12, 0), False),
    ],
)
def test_where_an_rtx_engine_runs(target, capability, runs):
    assert runs_on(target, capability) is runs


def test_hopper_gets_pointed_to_full_tensorrt(bundle):
    record = build_engine(bundle, "tensorrt-rtx")
    runner = TensorRTRTXRunner(bundle / record.path, record, [], [], max_batch=1)
    with pytest.raises(
        AvatarqError, match=r"does not run on this GPU \(NVIDIA H100, sm90\).*--backend tensorrt"
    ):
        runner.check_target((9, 0), "NVIDIA H100")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_full_tensorrt_says_it_is_not_installed(bundle):
    with pytest.raises(AvatarqError, match="backend tensorrt needs the Python module tensorrt"):
        get_backend("tensorrt").builder_class()


def _rtx_gpu() -> bool:
    return torch.cuda.is_available() and runs_on("ampere+", torch.cuda.get_device_capability())


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_rtx_engine_on_the_gpu_matches_onnx_runtime(bundle, cuda_graph):
    if not _rtx_gpu():
        pytest.skip("TensorRT-RTX does not run on this GPU")
    build_engine(bundle, "tensorrt-rtx", BuildOptions(max_batch=4))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 16)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (3, 1))
    with open_runner(bundle, "onnx") as reference:
        ref = reference.decode(z, view)[0].copy()
    options = RunOptions(cuda_graph=cuda_graph)
    with open_runner(bundle, "tensorrt-rtx", options) as runner:
        for batch in (3, 1, 3):
            texture, vertices = runner.decode(z[:batch], view[:batch])
    span = float(ref.max() - ref.min())
    psnr = 10 * np.log10(span**2 / np.mean((texture - ref) ** 2))
    assert texture.shape == (3, 3, 64, 64) and vertices.shape == (3, 30, 3)
    assert psnr > 40.0
