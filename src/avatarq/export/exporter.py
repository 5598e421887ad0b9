"""`export_bundle`: checkpoint (+ capture) -> a validated bundle directory; `export_decoder`:
the same for a declared decoder (any module, `avatarq.models.declare`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from avatarq import __version__
from avatarq.calibration.artifact import decoder_hash
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import DecoderInputs
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError
from avatarq.export.bundle import (
    MODEL_FILE,
    NORMALIZATION_FILE,
    REFERENCE_FILE,
    TOPOLOGY_FILE,
    Bundle,
    BundleWriter,
)
from avatarq.export.manifest import (
    Manifest,
    NormalizationRecord,
    ReferenceRecord,
    TensorSpec,
    ValidationRecord,
    dam_tensor_specs,
)
from avatarq.export.onnx_export import ExportConfig, export_onnx, layer_nodes, save_onnx
from avatarq.export.options import ExportOptions
from avatarq.export.storage import describe_storage, initializer_bytes
from avatarq.export.validate import validate_against_torch, validation_record
from avatarq.measure import Comparison, Tolerances
from avatarq.models.checkpoint import load_checkpoint
from avatarq.models.declaration import DecoderDeclaration, declaration_of
from avatarq.models.deploy import DeployableDecoder

# ORT CPU vs torch: float32 agrees to rounding; float16 loses ~11 bits per op.
FP32_MIN_PSNR_DB = 80.0
FP32_MAX_ABS_ERROR_01 = 1e-4  # in [0, 1] texture units (x peak for the texture's own units)
FP16_MIN_PSNR_DB = 50.0


@dataclass(frozen=True)
class ExportResult:
    """The written bundle, the export's check (None with validation off), and where the
    calibration samples came from (None unless calibrated now or from an artifact)."""

    bundle: Bundle
    validation: Comparison | None
    calibration: str | None = None


def validation_inputs(
    decoder: DeployableDecoder, capture, model, n: int, seed: int
) -> tuple[DecoderInputs, str]:
    """(inputs with z [n, Z] and view [n, 3], source): real codes from the capture when
    possible, else seeded N(0, 1) latents and views around the front."""
    if capture is not None and model.config.has_encoder:
        from avatarq.data.encode import encode_frames

        frames = capture.frames[: max(1, n)]
        names = list(capture.cameras)
        z = encode_frames(model, capture, frames)
        view = np.stack(
            [capture.view_direction(s, f, names[i % len(names)]) for i, (s, f) in enumerate(frames)]
        )
        inputs = DecoderInputs.from_z_view(z, view)
        return inputs, f"capture ({len(frames)} frames, encoder mean)"
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, decoder.config.z_dim, generator=gen)
    view = torch.randn(n, 3, generator=gen) * 0.3 + torch.tensor([0.0, 0.0, 1.0])
    view = view / view.norm(dim=1, keepdim=True)
    return DecoderInputs.from_z_view(z, view), f"seeded N(0, 1) latents (seed {seed})"


@dataclass
class _Source:
    """What an export starts from, besides its options.

    Attributes:
        decoder: the deployable decoder (a `DeployableDecoder` or a declared module).
        artifact: its calibration, or None (calibrate on ``samples`` now when quantizing).
        samples: calibration samples for that, or None (data-free).
        validation_inputs: returns (inputs, a line naming them) to validate on.
        source_sha256: of the checkpoint (or the declared module's parameters).
        calibration_data: names the data calibrated on now, for the progress line.
        capture: the Multiface capture (its topology goes into the bundle), or None.
        normalization: the capture's normalization folded into the graph, or None.
    """

    decoder: nn.Module
    artifact: Any
    samples: Any
    validation_inputs: Callable[[], tuple[DecoderInputs, str]]
    source_sha256: str
    calibration_data: Any = None
    capture: Any = None
    normalization: Any = None


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    capture_root: str | Path | None = None,
    options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
    force: bool = False,
) -> ExportResult:
    """Load ``checkpoint``, trace it to ONNX, validate, and write the bundle ``out``.

    With ``capture_root`` the de-normalization (texture in 0..255, vertices in capture
    units) is folded into the graph, the mesh topology goes into the bundle, and validation
    uses real latent codes of the capture. An existing ``out`` is replaced only when it is
    an avatarq bundle and ``force`` is set.
    """
    say = or_silent(progress)
    BundleWriter(out, force).abort()  # refuse a bad output before minutes of work
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
        capture.topology  # noqa: B018 - read (and check) the mesh before any work
    decoder = DeployableDecoder(model, normalization, options.camera)
    artifact = samples = None
    quantized = options.int8 or options.fp8
    if quantized:  # read and check the calibration (or its data) before any work
        say("reading calibration data")
        artifact, samples = _calibration_inputs(model, decoder, capture_root, options)

    def inputs_for_validation() -> tuple[DecoderInputs, str]:
        return validation_inputs(decoder, capture, model, options.n_validation, options.seed)

    source = _Source(decoder, artifact, samples, inputs_for_validation, file_sha256(checkpoint))
    source.calibration_data = options.calib_data or capture_root
    source.capture, source.normalization = capture, normalization
    return _export(source, out, options, say, force)


def _export(
    source: _Source, out: str | Path, options: ExportOptions, say: Progress, force: bool
) -> ExportResult:
    """Trace the decoder, quantize it with the artifact (or calibrate on the samples now),
    validate on ``source.validation_inputs()`` and write the bundle ``out``."""
    decoder, artifact, samples = source.decoder, source.artifact, source.samples
    capture, normalization = source.capture, source.normalization
    quantized = options.int8 or options.fp8
    declaration = declaration_of(decoder)
    say("tracing to ONNX")
    proto = export_onnx(decoder, ExportConfig(fp16=options.fp16, max_batch=options.max_batch))
    onnx.checker.check_model(proto)
    fp32_bytes = sum(initializer_bytes(i) for i in proto.graph.initializer)
    precision = "fp16" if options.fp16 else "fp32"
    layer_precision = {name: precision for name in sorted(layer_nodes(proto))}
    reference = None
    if options.reference and options.fp16:
        reference = export_onnx(decoder, ExportConfig(fp16=False, max_batch=options.max_batch))
        fp32_bytes = sum(initializer_bytes(i) for i in reference.graph.initializer)
    elif options.reference and quantized:
        reference = proto
    if quantized:
        if artifact is None:
            from avatarq.calibration import CalibrationConfig
            from avatarq.calibration.pipeline import calibrate

            kind = "POCA, fp8" if options.fp8 else "POCA"
            data = source.calibration_data
            say(f"calibrating ({kind})" if data else f"calibrating ({kind}, data-free)")
            bits = "fp8" if options.fp8 else "w8a8"
            config = CalibrationConfig(seed=options.seed, bits=bits)
            artifact = calibrate(decoder, samples, config, progress=say)
        from avatarq.export.qdq import QDQConfig, quantize_onnx

        say("inserting Q/DQ nodes")
        proto = quantize_onnx(proto, artifact, QDQConfig(options.conv_transpose_axis))
        onnx.checker.check_model(proto)
        layer_precision = dict(sorted(artifact.precision.items()))
        formats = set(layer_precision.values())
        precision = formats.pop() if len(formats) == 1 else "mixed"
    storage, sizes = describe_storage(proto)
    with BundleWriter(out, force) as writer:
        model_path = writer.path(MODEL_FILE)
        save_onnx(proto, model_path)
        sizes = {"model.onnx": model_path.stat().st_size, **sizes, "fp32_initializers": fp32_bytes}
        reference_record = None
        if reference is not None:
            save_onnx(reference, writer.path(REFERENCE_FILE))
            reference_record = ReferenceRecord(
                REFERENCE_FILE, file_sha256(writer.path(REFERENCE_FILE))
            )
        if capture is not None:
            capture.topology.save(writer.path(TOPOLOGY_FILE))
        if normalization is not None:
            _save_normalization(normalization, writer.path(NORMALIZATION_FILE))
        calib_sha = None
        if artifact is not None:
            artifact.save(writer.path("calib"))
            calib_sha = file_sha256(writer.path("calib") / "calib.json")
        result = None
        validation: ValidationRecord | None = None
        if options.validate:
            inputs, inputs_source = source.validation_inputs()
        if options.validate and artifact is not None:
            from avatarq.export.qdq import QDQConfig, validate_qdq

            say("validating Q/DQ graph with ONNX Runtime")
            result, vs_fp32 = validate_qdq(
                model_path, decoder, artifact, inputs, QDQConfig(options.conv_transpose_axis)
            )
            validation = validation_record(result, inputs_source)
            validation.reference = "torch fake-quant (the calibrated numerics)"
            validation.vs_fp32 = validation_record(vs_fp32, inputs_source)
            if not result:
                raise AvatarqError(
                    f"Q/DQ graph does not match the calibration: {result.summary()}; vs FP32: "
                    f"{vs_fp32.summary()}"
                )
        elif options.validate:
            say("validating with ONNX Runtime")
            tolerances = Tolerances(
                min_psnr_all=FP16_MIN_PSNR_DB if options.fp16 else FP32_MIN_PSNR_DB,
                max_abs_error=None
                if options.fp16 or not decoder.denormalized
                else FP32_MAX_ABS_ERROR_01,
            )
            result = validate_against_torch(
                model_path,
                decoder,
                inputs,
                tolerances,
                255.0 if decoder.denormalized else None,
                "torch fp32",
            )
            validation = validation_record(result, inputs_source)
            if not result:
                raise AvatarqError(f"exported graph does not match PyTorch: {result.summary()}")
        if isinstance(decoder, DeployableDecoder):
            inputs, outputs = dam_tensor_specs(decoder.config, decoder.denormalized)
            record = None
        else:
            inputs, outputs = _declared_specs(declaration)
            record = declaration.to_dict()
        manifest = Manifest(
            arch=declaration.arch,
            z_dim=_z_dim(declaration),
            tex_size=int(declaration.texture_shape[-2]),
            n_vertices=declaration.n_vertices,
            inputs=inputs,
            outputs=outputs,
            precision=precision,
            layer_precision=layer_precision,
            normalization=_normalization_record(normalization, declaration),
            model_sha256=file_sha256(model_path),
            source_checkpoint_sha256=source.source_sha256,
            versions=_versions(),
            export_options=options,
            reference=reference_record,
            camera=options.camera,
            validation=validation,
            calib_sha256=calib_sha,
            layer_storage=storage,
            size_bytes=sizes,
            declaration=record,
        )
        bundle = writer.commit(manifest)
    calibrated_on = None if artifact is None else str(artifact.samples.get("source", ""))
    return ExportResult(bundle, result, calibrated_on)


def _z_dim(declaration: DecoderDeclaration) -> int:
    """The latent size a bundle records: z's size when declared, else the first input's."""
    for spec in declaration.inputs:
        if spec.name == "z" and len(spec.shape) == 1:
            return spec.shape[0]
    return math.prod(declaration.inputs[0].shape)


def _declared_specs(
    declaration: DecoderDeclaration,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(s.name, "float32", ["batch", *s.shape], "declared input")
        for s in declaration.inputs
    ]
    meanings = ["texture (judged by the metrics)"]
    if declaration.mesh:
        meanings.append("head-local mesh vertices")
    outputs = [
        TensorSpec(
            name,
            "float32",
            ["batch", *shape],
            meanings[i] if i < len(meanings) else "declared output",
        )
        for i, (name, shape) in enumerate(
            zip(declaration.outputs, declaration.output_shapes, strict=True)
        )
    ]
    return inputs, outputs


def export_decoder(
    decoder: nn.Module,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    data: str | Path | DecoderInputs | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> ExportResult:
    """Export a declared decoder (`avatarq.models.declare`) to the bundle ``out``.

    ``data``: a latent .npz (or `DecoderInputs`) holding the decoder's inputs by name:
    calibration samples with ``options.int8``/``fp8`` (required then unless
    ``options.calib`` names an artifact) and the validation inputs (else seeded N(0, 1)
    draws, views around the front). The bundle has the declared inputs and outputs;
    nothing is rendered unless a mesh output is declared (and a topology added).
    """
    from avatarq.calibration.samples import check_samples

    say = or_silent(progress)
    BundleWriter(out, force).abort()  # refuse a bad output before minutes of work
    declaration = declaration_of(decoder)
    if isinstance(decoder, DeployableDecoder):
        raise AvatarqError("a Multiface DAM exports from its checkpoint: use export_bundle")
    if options.camera is not None:
        raise AvatarqError("--camera applies to a Multiface DAM only")
    sequence = _declared_data(data, options)
    artifact = samples = None
    if options.int8 or options.fp8:
        if options.calib is not None:
            from avatarq.calibration import CalibrationArtifact

            artifact = CalibrationArtifact.load(options.calib, decoder)
        elif sequence is None:
            raise AvatarqError(
                "--int8 with a declared decoder needs --data latents.npz holding its inputs "
                f"({', '.join(str(s) for s in declaration.inputs)}) or --calib"
            )
        else:
            from avatarq.calibration.samples import samples_from_latents

            samples = samples_from_latents(sequence.subset(range(len(sequence))), seed=options.seed)
            check_samples(decoder, samples)

    def inputs_for_validation() -> tuple[DecoderInputs, str]:
        if sequence is not None:
            n = min(len(sequence), options.n_validation)
            if n >= 2:
                return sequence.subset(range(n)), f"{sequence.source}, first {n} steps"
        return declared_validation_inputs(declaration, options.n_validation, options.seed)

    calibration_data = None if sequence is None else sequence.source
    source = _Source(
        decoder, artifact, samples, inputs_for_validation, decoder_hash(decoder), calibration_data
    )
    return _export(source, out, options, say, force)


def _declared_data(data, options: ExportOptions) -> DecoderInputs | None:
    """The latent data of a declared export, restricted to the decoder's inputs later."""
    if data is None and options.calib_data is not None:
        data = options.calib_data
    if data is None or isinstance(data, DecoderInputs):
        return data
    from avatarq.data.latents import load_inputs

    path = Path(data)
    if path.is_dir():
        raise AvatarqError(
            f"--data {path} is a folder; a declared decoder reads a latent .npz holding its inputs"
        )
    return load_inputs(path)


def declared_validation_inputs(
    declaration: DecoderDeclaration, n: int, seed: int
) -> tuple[DecoderInputs, str]:
    """Seeded N(0, 1) draws of every declared input (a ``view`` [3] input: unit vectors
    around the front, as for a DAM)."""
    gen = torch.Generator().manual_seed(seed)
    arrays = {}
    for spec in declaration.inputs:
        x = torch.randn(n, *spec.shape, generator=gen)
        if spec.name == "view" and spec.shape == (3,):
            x = x * 0.3 + torch.tensor([0.0, 0.0, 1.0])
            x = x / x.norm(dim=1, keepdim=True)
        arrays[spec.name] = x.numpy()
    return DecoderInputs(arrays), f"seeded N(0, 1) inputs (seed {seed})"


def _calibration_inputs(model, decoder: DeployableDecoder, capture_root, options: ExportOptions):
    """(the artifact of ``--calib``, loaded and checked against ``decoder``, None) or (None,
    the samples to calibrate on now: ``--data``, the capture, or data-free)."""
    from avatarq.calibration import CalibrationArtifact
    from avatarq.calibration.from_files import load_samples

    if options.calib is not None:
        artifact = CalibrationArtifact.load(options.calib, decoder)
        bits = artifact.config.get("bits")
        if options.fp8 and bits != "fp8":
            raise AvatarqError(
                f"--fp8 needs an FP8 calibration (avatarq calibrate --fp8); {options.calib} "
                f"is {bits}; export it with --int8"
            )
        return artifact, None
    capture = None
    if options.calib_data is None and capture_root is not None:
        from avatarq.data.capture import MultifaceCapture

        capture = MultifaceCapture(capture_root)
    return None, load_samples(model, options.calib_data, capture, seed=options.seed)


def _normalization_record(normalization, declaration=None) -> NormalizationRecord:
    if normalization is None and declaration is not None and declaration.arch == "declared":
        return NormalizationRecord(
            folded=False, note="a declared decoder: outputs are in the module's own units"
        )
    if normalization is None:
        return NormalizationRecord(
            folded=False,
            note="outputs are Multiface-normalized; the checkpoint alone does not know the "
            "capture's means and stds (export with --capture to include them)",
        )
    return NormalizationRecord(
        folded=True,
        note="texture = t * tex_std + tex_mean and vertices = v * vert_std + vert_mean are in "
        "the graph",
        tex_std=float(normalization.tex_std),
        vert_std=float(normalization.vert_std),
        arrays=NORMALIZATION_FILE,
    )


def _save_normalization(normalization, path: Path) -> None:
    np.savez(
        path,
        tex_mean=np.asarray(normalization.tex_mean, np.float32),
        tex_std=np.float32(normalization.tex_std),
        vert_mean=np.asarray(normalization.vert_mean, np.float32),
        vert_std=np.float32(normalization.vert_std),
    )


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "avatarq": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
