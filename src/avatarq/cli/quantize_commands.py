"""``avatarq calibrate`` and ``avatarq export``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import (
    CameraOption,
    CaptureOption,
    DataOption,
    DecoderArgument,
    ForceOption,
    InputOption,
    JsonOption,
    MeshOutputOption,
    SeedOption,
    TextureOutputOption,
    command,
    config_from,
    console,
    declared_decoder,
    progress_bar,
)
from avatarq.core.documents import document_dict
from avatarq.core.files import check_parent
from avatarq.errors import AvatarqError

#: Measured on the demo avatar (docs/benchmarks.md, "Data-free calibration").
DATA_FREE_NOTE = (
    "calibrated data-free (no visibility masks); a capture (--capture) or recorded latents "
    "(--data) calibrate better: see docs/benchmarks.md, section Data-free calibration"
)


def default_bundle_path(model: Path, kind: str) -> Path:
    """``dam.pt`` -> ``dam_int8.avq`` (or ``_fp16``, ``_fp32``) next to the checkpoint."""
    return model.with_name(f"{model.stem}_{kind}.avq")


@command()
def calibrate(
    ctx: typer.Context,
    model: DecoderArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration artifact directory.")],
    inputs: InputOption = None,
    texture_output: TextureOutputOption = None,
    mesh_output: MeshOutputOption = None,
    data: DataOption = None,
    capture: CaptureOption = None,
    method: Annotated[str, typer.Option(help="poca or max (standard PTQ, no masks).")] = "poca",
    tau: Annotated[
        float,
        typer.Option(
            help="Std-mask threshold: fraction of positions dropped (POCA ships 0.9; "
            "0 measured best on the synthetic avatar, see docs/benchmarks.md)."
        ),
    ] = 0.0,
    bits: Annotated[
        str,
        typer.Option(
            help="Format of the quantized layers: w8a8, w6a6, w4a8, w4a4 (any wXaY, X and Y "
            "in 2..8; weights of <= 4 bits are stored as packed INT4) or fp8."
        ),
    ] = "w8a8",
    fp8: Annotated[
        bool, typer.Option("--fp8", help="FP8 E4M3 weights and activations (= --bits fp8).")
    ] = False,
    iters: Annotated[
        int, typer.Option(min=0, max=1_000_000, help="Adam iterations per layer (upper bound).")
    ] = 100,
    samples: Annotated[
        int, typer.Option(min=1, max=100_000, help="Random (frame, camera) samples.")
    ] = 64,
    temporal_weight: Annotated[float, typer.Option(help="Weight of the temporal term.")] = 0.0,
    adaround: Annotated[bool, typer.Option(help="Learn weight rounding (AdaRound).")] = False,
    gptq: Annotated[
        bool | None,
        typer.Option(
            "--gptq/--no-gptq",
            help="Second-order weight rounding with the mask-weighted Hessian (default: the "
            "measured default of --bits).",
        ),
    ] = None,
    smooth: Annotated[
        bool | None,
        typer.Option(
            "--smooth/--no-smooth",
            help="Activation smoothing folded into the previous layer (default: per --bits).",
        ),
    ] = None,
    smooth_alpha: Annotated[float, typer.Option(help="Smoothing strength in [0, 1].")] = 0.5,
    hadamard: Annotated[
        bool | None,
        typer.Option(
            "--hadamard/--no-hadamard",
            help="Rotate each quantized layer's input channels (Walsh-Hadamard; default: per "
            "--bits).",
        ),
    ] = None,
    weight_block: Annotated[
        int, typer.Option(help="Input channels per weight scale (0: one per output channel).")
    ] = 0,
    weight_search: Annotated[
        str | None,
        typer.Option(help="Initial weight scales: max or mse (default: per --bits)."),
    ] = None,
    bias_format: Annotated[
        str,
        typer.Option(
            help="Storage of the texel biases and the mean-texture offset: fp32, fp16, "
            "int8 (offset fp16) or int4 (offset in uint8 blocks)."
        ),
    ] = "fp32",
    size_budget: Annotated[
        str | None,
        typer.Option(
            help="Allocate formats per layer under a size budget: megabytes of model "
            "initializers (3.5MB) or bits per layer weight (4.5bpp)."
        ),
    ] = None,
    asymmetric: Annotated[
        bool, typer.Option(help="Asymmetric activations (ONNX Runtime targets only).")
    ] = False,
    fp16_budget: Annotated[
        int, typer.Option(min=0, max=100_000, help="Most sensitive layers kept in FP16.")
    ] = 0,
    precision: Annotated[
        str | None, typer.Option(help="Overrides, e.g. 'dec.mesh_fc=fp16,dec.z_fc=w8a8'.")
    ] = None,
    camera: CameraOption = None,
    seed: SeedOption = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Calibrate a decoder with POCA and write the calibration artifact.

    Example: avatarq calibrate --model dam.pt --data capture/ --bits w4a8 -o calib/

    Your own decoder: avatarq calibrate --model my_decoder.py:factory --input z:256
    --input view:3 --texture-output 0 --data latents.npz -o calib/
    """
    from avatarq.calibration import CalibrationConfig, parse_precision
    from avatarq.calibration.formats import parse_format
    from avatarq.calibration.from_files import calibrate_decoder
    from avatarq.core.progress import PhaseTimer
    from avatarq.models.checkpoint import load_checkpoint

    if fp8:
        if parse_format(bits).name not in ("w8a8", "fp8"):
            raise AvatarqError(f"--fp8 and --bits {bits} disagree; give one of them")
        bits = "fp8"
    fmt = parse_format(bits)
    if not fmt.quantized:
        raise AvatarqError(f"--bits must be a quantized format (wXaY or fp8), got {bits!r}")
    config = config_from(
        ctx,
        CalibrationConfig,
        bits=fmt.name,
        symmetric=not asymmetric,
        precision=parse_precision(precision, bits=fmt.name) if precision else {},
    )
    _check_output(out, "calib.json", force)
    declared = declared_decoder(model, inputs, texture_output, mesh_output)
    if declared is not None:
        from avatarq.calibration.from_files import calibrate_declared

        for name, value in (("--capture", capture), ("--camera", camera)):
            if value is not None:
                raise AvatarqError(f"{name} applies to a Multiface DAM, not to your own decoder")
    else:
        loaded = load_checkpoint(model)
    with progress_bar("calibrate") as progress:
        timer = PhaseTimer(progress)
        started = time.perf_counter()
        if declared is not None:
            artifact = calibrate_declared(declared, data, config, samples, timer)
        else:
            _, artifact = calibrate_decoder(loaded, data, capture, config, samples, camera, timer)
        artifact.save(out)
    seconds = {**timer.stop(), "total": round(time.perf_counter() - started, 3)}
    plan = artifact.precision
    source = artifact.samples.get("source", "")
    if as_json:
        layers = [layer.to_json() for layer in artifact.layers]
        record = {"out": str(out), "samples": source, "precision": plan, "seconds": seconds}
        console.print_json(json.dumps({**record, "layers": layers}))
        return
    counts = {p: list(plan.values()).count(p) for p in sorted(set(plan.values()))}
    console.print(
        f"calibration {out}  ({method}, tau {tau}, {config.bits}; "
        + ", ".join(f"{n} {p}" for p, n in counts.items())
        + " layers)"
    )
    console.print(f"samples     {source}", highlight=False)
    if source.startswith("data-free"):
        console.print(f"note        {DATA_FREE_NOTE}", highlight=False, soft_wrap=True)


def _check_output(out: Path, marker: str, force: bool) -> None:
    """Refuse an output folder avatarq did not write, or one it wrote without --force."""
    if out.exists() and not out.is_dir():
        raise AvatarqError(f"{out} exists and is not a folder; choose another output")
    check_parent(out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise AvatarqError(
                f"{out} exists and was not written by avatarq; refusing to replace it"
            )
        if not force:
            raise AvatarqError(f"{out} exists; pass --force to replace it")


@command()
def export(
    ctx: typer.Context,
    model: DecoderArgument,
    inputs: InputOption = None,
    texture_output: TextureOutputOption = None,
    mesh_output: MeshOutputOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Bundle directory to write (default: dam_int8.avq etc. beside dam.pt).",
        ),
    ] = None,
    capture: CaptureOption = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="FP16 graph with FP32 inputs/outputs.")
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Quantized graph with Q/DQ nodes in the calibration's formats (w8a8, w4a8, "
            "..., mixed).",
        ),
    ] = False,
    fp8: Annotated[
        bool,
        typer.Option("--fp8", help="FP8 E4M3 Q/DQ graph (an fp8 calibration, or calibrate now)."),
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(help="Calibration artifact (avatarq calibrate); omitted: calibrate now."),
    ] = None,
    data: DataOption = None,
    conv_transpose_axis: Annotated[
        str, typer.Option(help="ConvTranspose weight-scale axis: 1, 0 or tensor.")
    ] = "1",
    camera: CameraOption = None,
    max_batch: Annotated[
        int, typer.Option(min=1, max=4096, help="Upper bound of the dynamic batch.")
    ] = 64,
    validate: Annotated[
        bool, typer.Option(help="Check the graph against PyTorch with ORT.")
    ] = True,
    reference: Annotated[
        bool, typer.Option(help="Keep the FP32 graph in INT8/FP16 bundles (bench needs it).")
    ] = True,
    seed: SeedOption = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Trace a decoder to ONNX and write a validated bundle.

    Without --capture or --data, --int8 calibrates data-free (latents from the prior).

    Example: avatarq export --model dam.pt --int8

    Your own decoder: avatarq export --model my_decoder.py:factory --input z:256 --input
    view:3 --texture-output 0 --int8 --data latents.npz -o my.avq
    """
    from avatarq.core.progress import PhaseTimer
    from avatarq.export import ExportOptions, export_bundle
    from avatarq.export.exporter import export_decoder

    axes = {"1": 1, "0": 0, "tensor": None}
    if conv_transpose_axis not in axes:
        raise AvatarqError(
            f"--conv-transpose-axis must be 1, 0 or tensor, got {conv_transpose_axis!r}"
        )
    if data is not None and not (int8 or fp8):
        raise AvatarqError("--data goes with --int8 or --fp8 (it is what the calibration runs on)")
    options = config_from(
        ctx,
        ExportOptions,
        calib=None if calib is None else str(calib),
        calib_data=None if data is None else str(data),
        conv_transpose_axis=axes[conv_transpose_axis],
    )
    kind = "int8" if int8 else "fp8" if fp8 else "fp16" if fp16 else "fp32"
    declared = declared_decoder(model, inputs, texture_output, mesh_output)
    if declared is not None:
        if out is None:
            raise AvatarqError("your own decoder needs an output bundle: -o my.avq")
        if capture is not None:
            raise AvatarqError("--capture applies to a Multiface DAM, not to your own decoder")
    out = out if out is not None else default_bundle_path(model, kind)
    with progress_bar("export") as progress:
        timer = PhaseTimer(progress)
        started = time.perf_counter()
        if declared is not None:
            result = export_decoder(declared, out, options, None, timer, force)
        else:
            result = export_bundle(model, out, capture, options, timer, force)
    seconds = {**timer.stop(), "total": round(time.perf_counter() - started, 3)}
    manifest = result.bundle.manifest
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "bundle": str(result.bundle.root),
                    "precision": manifest.precision,
                    "calibration": result.calibration,
                    "seconds": seconds,
                    "validation": None
                    if manifest.validation is None
                    else document_dict(manifest.validation),
                }
            )
        )
        return
    size = manifest.size_bytes.get("model.onnx")
    fp32 = manifest.size_bytes.get("fp32_initializers")
    shown = f", model.onnx {size / 1e6:.2f} MB" if size else ""
    if size and fp32:
        shown += f", {fp32 / size:.2f}x below FP32"
    console.print(f"bundle      {result.bundle.root}  ({manifest.precision}{shown})")
    if result.calibration is not None:
        console.print(f"calibration {result.calibration}", highlight=False)
        if result.calibration.startswith("data-free"):
            console.print(f"note        {DATA_FREE_NOTE}", highlight=False, soft_wrap=True)
    if result.validation is not None:
        reference_name = "fake-quant" if int8 or fp8 else "PyTorch"
        console.print(
            f"validation  ORT vs {reference_name}: {result.validation.summary()}",
            highlight=False,
            soft_wrap=True,
        )
    validation = manifest.validation
    if validation is not None and validation.vs_fp32 is not None:
        console.print(
            f"vs FP32     texture PSNR {validation.vs_fp32.texture_psnr_db:.1f} dB, "
            f"max|err| {validation.vs_fp32.texture_max_abs_error:.3g}"
        )
