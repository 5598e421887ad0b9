"""``avatarq build`` and ``avatarq compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import (
    BatchOption,
    CheckpointOption,
    DeviceOption,
    JsonOption,
    LatentsOption,
    SeedOption,
    ThreadsOption,
    command,
    config_from,
    console,
    progress_bar,
)
from avatarq.core.documents import document_dict

BundleArgument = Annotated[Path, typer.Argument(help="Bundle directory (from avatarq export).")]


@command()
def build(
    ctx: typer.Context,
    bundle: BundleArgument,
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="onnxruntime, tensorrt-rtx or tensorrt.")
    ] = "onnxruntime",
    max_batch: Annotated[
        int, typer.Option(min=1, max=4096, help="Largest batch (TensorRT profile max).")
    ] = 8,
    opt_batch: Annotated[int, typer.Option(min=1, max=4096, help="Batch TensorRT tunes for.")] = 1,
    min_batch: Annotated[
        int, typer.Option(min=1, max=4096, help="Smallest batch of the TensorRT profile.")
    ] = 1,
    opt_level: Annotated[
        int, typer.Option("--opt-level", min=0, max=5, help="TensorRT builder optimization level.")
    ] = 3,
    compute_capability: Annotated[
        list[str] | None,
        typer.Option(
            "--compute-capability",
            help="TensorRT-RTX target, repeatable (sm75, sm86, sm89, sm120); default Ampere+.",
        ),
    ] = None,
    timing_cache: Annotated[
        bool, typer.Option(help="Reuse/update the TensorRT timing cache in the bundle.")
    ] = True,
    rewrite: Annotated[
        bool, typer.Option(help="onnxruntime: rewrite ConvTranspose into phase convs (INT8 path).")
    ] = True,
    latents: LatentsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build an engine for a bundle and record it in its manifest.

    The ONNX Runtime build checks the engine against the exported graph on --latents, or
    on a smooth latent clip.

    Example: avatarq build dam_int8.avq --backend onnxruntime
    """
    from avatarq.engines import BuildOptions, build_engine

    options = config_from(
        ctx,
        BuildOptions,
        optimization_level=opt_level,
        compute_capabilities=tuple(compute_capability or ()),
        ort_rewrite=rewrite,
        calibration_latents=None if latents is None else str(latents),
    )
    with progress_bar(f"build {backend}") as progress:
        record = build_engine(bundle, backend, options, progress)
    if as_json:
        console.print_json(json.dumps({"bundle": str(bundle), "engine": document_dict(record)}))
        return
    console.print(
        f"engine      {bundle / record.path}  ({record.backend} {record.library_version}, "
        f"target {record.target}, {record.size_bytes / 1e6:.1f} MB, {record.build_seconds:.1f} s)"
    )
    rewrite_record = getattr(record, "rewrite", None)
    if rewrite_record is not None:
        modes = [layer.mode for layer in rewrite_record.layers]
        console.print(
            f"rewrite     {modes.count('int8')} int8 / {modes.count('float')} float / "
            f"{modes.count('kept')} kept layers"
        )
    check = getattr(record, "check", None)
    if check is not None:
        console.print(
            f"check       vs model.onnx: texture max|err| {check.texture_max_abs_error:.3g}, "
            f"PSNR {check.texture_psnr_db:.1f} dB (worst input {check.texture_psnr_min_db:.1f} dB)"
        )
    if getattr(record, "layers", None):
        console.print(f"layers      {bundle / record.layers}")


@command()
def compare(
    bundle: BundleArgument,
    reference: Annotated[
        str, typer.Option(help="Reference backend: onnx (model.onnx as exported), torch, ...")
    ] = "onnx",
    candidate: Annotated[
        str, typer.Option(help="Candidate backend; auto = the best engine built for here.")
    ] = "auto",
    latents: LatentsOption = None,
    frames: Annotated[
        int, typer.Option(min=2, max=100_000, help="Frames of the smooth clip.")
    ] = 32,
    seed: SeedOption = 0,
    batch: BatchOption = 1,
    checkpoint: CheckpointOption = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="torch candidate in float16.")] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = 0,
    min_psnr: Annotated[
        float | None, typer.Option(help="Fail (exit 1) below this mean PSNR, dB.")
    ] = None,
    max_jitter: Annotated[
        float | None, typer.Option(help="Fail (exit 1) above this jitter ratio J.")
    ] = None,
    ssim: Annotated[bool, typer.Option(help="Compute SSIM per frame.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Run two backends on the same ordered inputs; print errors, PSNR and temporal metrics.

    Example: avatarq compare dam_int8.avq --reference onnx --candidate onnxruntime
    """
    from avatarq.engines import RunOptions
    from avatarq.engines.compare import compare_bundle
    from avatarq.measure import Tolerances

    common = {
        "device": device,
        "threads": threads,
        "max_batch": batch,
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }
    result = compare_bundle(
        bundle,
        reference,
        candidate,
        RunOptions(**common),
        RunOptions(**common, fp16=fp16),
        latents=latents,
        n_frames=frames,
        seed=seed,
        tolerances=Tolerances(min_psnr=min_psnr, max_jitter_ratio=max_jitter),
        batch=batch,
        compute_ssim=ssim,
    )
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
    else:
        console.print(result.summary(), markup=False, highlight=False)
    if not result:
        raise typer.Exit(1)
