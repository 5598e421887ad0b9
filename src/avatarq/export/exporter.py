"""`export_bundle`: checkpoint (+ capture) -> a validated bundle directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from avatarq import __version__
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, BundleWriter, Manifest, TensorSpec
from avatarq.export.onnx_export import ExportConfig, export_onnx, layer_nodes, save_onnx
from avatarq.export.storage import describe_storage, initializer_bytes
from avatarq.export.validate import ValidationResult, validate_against_torch
from avatarq.models.checkpoint import file_sha256, load_checkpoint
from avatarq.models.deploy import DeployableDecoder

# ORT CPU vs torch: float32 agrees to rounding; float16 loses ~11 bits per op.
FP32_MIN_PSNR_DB = 80.0
FP32_MAX_ABS_ERROR_01 = 1e-4  # in [0, 1] texture units (x peak for the texture's own units)
FP16_MIN_PSNR_DB = 50.0


@dataclass(frozen=True)
class ExportOptions:
    """Options of `avatarq export` for float graphs.

    Attributes:
        fp16: float16 inside, float32 at the graph's inputs and outputs.
        camera: fold this camera's colour correction into the texture (None: none applied).
        max_batch: upper bound of the dynamic batch dimension.
        validate: run the graph with ONNX Runtime and compare with PyTorch.
        n_validation: number of (z, view) samples used by the validation.
        seed: seed for validation inputs when no capture is given.
        int8: write the calibration's precision plan (any format: w8a8, w4a8, fp8, mixed)
            as Q/DQ nodes.
        fp8: the same, for an FP8 calibration: ``calib`` must be one (bits fp8); without
            it, calibrate on the fly with POCA defaults at fp8.
        calib: a calibration artifact directory (`avatarq calibrate`); None with ``int8``
            calibrates on the fly with POCA defaults on ``calib_data`` or the capture.
        calib_data: capture root or latents .npz for on-the-fly calibration.
        conv_transpose_axis: weight-scale axis of ConvTranspose Q/DQ (1, 0 or None).
    """

    fp16: bool = False
    camera: int | None = None
    max_batch: int = 64
    validate: bool = True
    n_validation: int = 8
    seed: int = 0
    int8: bool = False
    fp8: bool = False
    calib: str | None = None
    calib_data: str | None = None
    conv_transpose_axis: int | None = 1


@dataclass(frozen=True)
class ExportResult:
    bundle: Bundle
    validation: ValidationResult | None


def validation_inputs(
    decoder: DeployableDecoder, capture, model, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(z [n, Z], view [n, 3], source) - real codes from the capture when possible."""
    if capture is not None and model.config.has_encoder:
        from avatarq.data.encode import encode_frames

        frames = capture.frames[: max(1, n)]
        names = list(capture.cameras)
        z = encode_frames(model, capture, frames)
        view = torch.from_numpy(
            np.stack(
                [
                    capture.view_direction(s, f, names[i % len(names)])
                    for i, (s, f) in enumerate(frames)
                ]
            )
        )
        return z, view, f"capture ({len(frames)} frames, encoder mean)"
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, decoder.config.z_dim, generator=gen)
    view = torch.randn(n, 3, generator=gen) * 0.3 + torch.tensor([0.0, 0.0, 1.0])
    view = view / view.norm(dim=1, keepdim=True)
    return z, view, f"seeded N(0, 1) latents (seed {seed})"


def _tensor_specs(decoder: DeployableDecoder) -> tuple[list[TensorSpec], list[TensorSpec]]:
    c = decoder.config
    units = "0..255 texel units" if decoder.denormalized else "Multiface-normalized units"
    inputs = [
        TensorSpec("z", "float32", ["batch", c.z_dim], "latent code (encoder mean)"),
        TensorSpec("view", "float32", ["batch", 3], "unit view direction, head coordinates"),
    ]
    outputs = [
        TensorSpec(
            "texture",
            "float32",
            ["batch", 3, c.tex_size, c.tex_size],
            f"RGB texture, {units}, row 0 = uv v 0 (flipped-on-load orientation)",
        ),
        TensorSpec(
            "vertices",
            "float32",
            ["batch", c.n_vertices, 3],
            "head-local mesh vertices"
            + (" (capture units)" if decoder.denormalized else " (normalized)"),
        ),
    ]
    return inputs, outputs


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    capture_root: str | Path | None = None,
    options: ExportOptions = ExportOptions(),
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Load ``checkpoint``, trace it to ONNX, validate, and write the bundle ``out``.

    With ``capture_root`` the de-normalization (texture in 0..255, vertices in capture
    units) is folded into the graph, the mesh topology goes into the bundle, and validation
    uses real latent codes of the capture.
    """
    say = progress or (lambda _msg: None)
    model = load_checkpoint(checkpoint)
    capture = normalization = None
    if capture_root is not None:
        from avatarq.data.capture import MultifaceCapture
        from avatarq.data.encode import capture_normalization

        capture = MultifaceCapture(capture_root)
        if capture.vert_mean.size != model.config.mesh_size:
            raise AvatarqError(
                f"capture {capture_root} has {capture.vert_mean.size // 3} vertices, "
                f"the checkpoint {model.config.n_vertices}"
            )
        normalization = capture_normalization(capture)
    decoder = DeployableDecoder(model, normalization, options.camera)
    say("tracing to ONNX")
    quantized = options.int8 or options.fp8
    if quantized and options.fp16:
        raise AvatarqError(
            f"--{'fp8' if options.fp8 else 'int8'} and --fp16 are exclusive: FP16 layers of a "
            "quantized plan come from the calibration"
        )
    if options.int8 and options.fp8:
        raise AvatarqError("--int8 and --fp8 are exclusive: the calibration's bits decide")
    proto = export_onnx(decoder, ExportConfig(fp16=options.fp16, max_batch=options.max_batch))
    onnx.checker.check_model(proto)
    fp32_bytes = sum(initializer_bytes(i) for i in proto.graph.initializer)
    precision = "fp16" if options.fp16 else "fp32"
    layer_precision = {name: precision for name in sorted(layer_nodes(proto))}
    artifact = None
    if quantized:
        artifact = _calibration(model, decoder, capture_root, options, say)
        from avatarq.export.qdq import QDQConfig, quantize_onnx

        say("inserting Q/DQ nodes")
        proto = quantize_onnx(proto, artifact, QDQConfig(options.conv_transpose_axis))
        onnx.checker.check_model(proto)
        layer_precision = dict(sorted(artifact.precision.items()))
        formats = set(layer_precision.values())
        precision = formats.pop() if len(formats) == 1 else "mixed"
    storage, sizes = describe_storage(proto)
    with BundleWriter(out) as writer:
        model_path = writer.path("model.onnx")
        save_onnx(proto, model_path)
        sizes = {"model.onnx": model_path.stat().st_size, **sizes, "fp32_initializers": fp32_bytes}
        if capture is not None:
            capture.topology.save(writer.path("topology.npz"))
        calib_sha = None
        if artifact is not None:
            artifact.save(writer.path("calib"))
            calib_sha = file_sha256(writer.path("calib") / "calib.json")
        result = None
        validation: dict = {}
        if options.validate and artifact is not None:
            from avatarq.export.qdq import QDQConfig, validate_qdq

            say("validating Q/DQ graph with ONNX Runtime")
            z, view, source = validation_inputs(
                decoder, capture, model, options.n_validation, options.seed
            )
            qdq = validate_qdq(
                model_path, decoder, artifact, z, view, QDQConfig(options.conv_transpose_axis)
            )
            result = qdq.vs_fakequant
            validation = {
                "reference": "torch fake-quant (the calibrated numerics)",
                "inputs": source,
                **qdq.vs_fakequant.to_dict(),
                "vs_fp32": qdq.vs_fp32.to_dict(),
            }
            if not qdq:
                raise AvatarqError(f"Q/DQ graph does not match the calibration: {qdq.summary()}")
        elif options.validate:
            say("validating with ONNX Runtime")
            z, view, source = validation_inputs(
                decoder, capture, model, options.n_validation, options.seed
            )
            result = validate_against_torch(
                model_path,
                decoder,
                z,
                view,
                decoder.denormalized,
                FP16_MIN_PSNR_DB if options.fp16 else FP32_MIN_PSNR_DB,
                None if options.fp16 or not decoder.denormalized else FP32_MAX_ABS_ERROR_01 * 255.0,
            )
            validation = {"reference": "torch fp32", "inputs": source, **result.to_dict()}
            if not result:
                raise AvatarqError(f"exported graph does not match PyTorch: {result.summary()}")
        inputs, outputs = _tensor_specs(decoder)
        manifest = Manifest(
            arch=model.config.arch,
            z_dim=model.config.z_dim,
            tex_size=model.config.tex_size,
            n_vertices=model.config.n_vertices,
            inputs=inputs,
            outputs=outputs,
            precision=precision,
            layer_precision=layer_precision,
            normalization=_normalization_record(decoder, normalization),
            source_checkpoint_sha256=file_sha256(checkpoint),
            versions=_versions(),
            camera=options.camera,
            validation=validation,
            calib_sha256=calib_sha,
            layer_storage={name: s.to_dict() for name, s in storage.items()},
            size_bytes=sizes,
        )
        manifest.validation["export_options"] = asdict(options)
        bundle = writer.commit(manifest)
    return ExportResult(bundle, result)


def _calibration(model, decoder: DeployableDecoder, capture_root, options: ExportOptions, say):
    """The artifact to export with: loaded and validated, or calibrated now with defaults."""
    from avatarq.calibration import CalibrationArtifact, CalibrationConfig
    from avatarq.calibration.from_files import load_samples
    from avatarq.calibration.pipeline import calibrate

    flag = "--fp8" if options.fp8 else "--int8"
    if options.calib is not None:
        artifact = CalibrationArtifact.load(options.calib, decoder)
        bits = artifact.config.get("bits")
        if options.fp8 and bits != "fp8":
            raise AvatarqError(
                f"--fp8 needs an FP8 calibration (avatarq calibrate --fp8); {options.calib} "
                f"is {bits}; export it with --int8"
            )
        return artifact
    data = options.calib_data or capture_root
    if data is None:
        raise AvatarqError(
            f"{flag} without --calib calibrates on the fly and needs --capture or --data"
        )
    say(f"calibrating (POCA{', fp8' if options.fp8 else ''})")
    samples = load_samples(model, data, seed=options.seed)
    bits = "fp8" if options.fp8 else "w8a8"
    return calibrate(decoder, samples, CalibrationConfig(seed=options.seed, bits=bits))


def _normalization_record(decoder: DeployableDecoder, normalization) -> dict:
    if normalization is None:
        return {
            "folded": False,
            "note": "outputs are Multiface-normalized; apply tex/vert mean and std",
        }
    return {
        "folded": True,
        "tex_std": float(normalization.tex_std),
        "vert_std": float(normalization.vert_std),
        "note": "texture = t * tex_std + tex_mean and vertices = v * vert_std + vert_mean are in the graph",
    }


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "avatarq": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
