"""``avatarq bench`` and ``avatarq demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import (
    BatchOption,
    CaptureOption,
    CheckpointOption,
    DeviceOption,
    JsonOption,
    ThreadsOption,
    command,
    config_from,
    console,
    progress_bar,
)
from avatarq.errors import AvatarqError

#: Largest render side accepted by --resolution (pixels).
MAX_RESOLUTION = 16384


def default_report_path(bundle: Path) -> Path:
    """``dam_int8.avq`` -> ``dam_int8_report`` beside it."""
    name = bundle.name[: -len(".avq")] if bundle.name.endswith(".avq") else bundle.name
    return bundle.with_name(f"{name}_report")


def _resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if not (1 <= h <= MAX_RESOLUTION and 1 <= w <= MAX_RESOLUTION):
        raise AvatarqError(
            f"--resolution must be HxW in pixels (1..{MAX_RESOLUTION} each), e.g. 1024x667; "
            f"got {text!r}"
        )
    return h, w


@command()
def bench(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from avatarq export).")],
    sequence: Annotated[
        str | None,
        typer.Option(
            help="CAPTURE:SEGMENT[:CAMERA], a latent .npz, or omitted: the capture's first "
            "segment (with --capture and --checkpoint) or a smooth latent clip."
        ),
    ] = None,
    runner: Annotated[
        list[str] | None,
        typer.Option(
            "--runner",
            help="Backend to benchmark (repeatable): onnx, onnxruntime, torch, tensorrt, "
            "tensorrt-rtx. Default: onnx plus every engine built into the bundle.",
        ),
    ] = None,
    render: Annotated[
        str, typer.Option(help="Renderer: auto, torch, nvdiffrast or none.")
    ] = "auto",
    gate: Annotated[
        list[str] | None,
        typer.Option(
            help="Release gate(s), e.g. 'psnr>=40,J<=0.5,p99_ms<=20' (repeatable); "
            "the command exits 1 when one fails."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Report directory (default: BUNDLE_report beside the bundle)."
        ),
    ] = None,
    checkpoint: CheckpointOption = None,
    capture: CaptureOption = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="An FP32 bundle of the same checkpoint as the reference."),
    ] = None,
    resolution: Annotated[
        str | None, typer.Option(help="Render size HxW (default: the camera's image size).")
    ] = None,
    warmup: Annotated[
        int, typer.Option(min=0, max=1_000_000, help="Untimed iterations per runner.")
    ] = 3,
    iters: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Timed iterations per runner.")
    ] = 20,
    batch: BatchOption = 1,
    gate_space: Annotated[
        str, typer.Option(help="Fidelity gates read texture or screen metrics.")
    ] = "texture",
    ssim: Annotated[bool, typer.Option(help="Compute SSIM per frame (slow on big frames).")] = True,
    interleave: Annotated[
        bool, typer.Option(help="Time runners round-robin (fairer ratios on a busy machine).")
    ] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = 0,
    perceptual: Annotated[
        str | None,
        typer.Option(
            help="Perceptual video metric in JOD, scored on the CPU: fvvdp (FovVideoVDP) or "
            "cvvdp (ColorVideoVDP); needs pip install 'avatarq[perceptual]'. Gate: 'jod>=9.5'."
        ),
    ] = None,
    perceptual_display: Annotated[
        str, typer.Option(help="Display model of the perceptual metric.")
    ] = "standard_fhd",
    perceptual_size: Annotated[
        int, typer.Option(help="Longest side (pixels) of the frames the metric scores.")
    ] = 256,
    frame_rate: Annotated[
        float, typer.Option(help="Frames per second the clip plays at (perceptual metric).")
    ] = 30.0,
    vq: Annotated[
        bool,
        typer.Option(
            "--vq",
            help="Also run each runner behind the bundle's latent codebook (avatarq vq): "
            "z coded and decoded before the decoder, judged against FP32 with the plain z.",
        ),
    ] = False,
    codebook: Annotated[
        Path | None,
        typer.Option(help="A codebook file (avatarq vq -o) instead of the bundle's; implies --vq."),
    ] = None,
    caching: Annotated[
        bool,
        typer.Option(
            "--caching",
            help="Bench the Neural-Caching mode instead (distill-warp --bundle): latency of "
            "the warp path and of the full decoder, quality and tDE of each vs FP32.",
        ),
    ] = False,
    refresh: Annotated[
        int | None,
        typer.Option(min=1, max=10_000, help="--caching: cache period N (default: the bundle's)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Benchmark a bundle: latency, fidelity and temporal stability vs FP32, with gates.

    The FP32 reference is the bundle's own reference graph unless --checkpoint or
    --reference names another.

    Example: avatarq bench dam_int8.avq --gate 'psnr>=40,J<=0.5'
    """
    from avatarq.bench import BenchConfig, bench_bundle

    if caching:
        _bench_caching(
            bundle, sequence, checkpoint, capture, refresh, warmup, iters, threads, as_json
        )
        return

    config = config_from(
        ctx,
        BenchConfig,
        runners=tuple(runner or ()),
        resolution=_resolution(resolution),
        gates=tuple(gate or ()),
        compute_ssim=ssim,
        codebook=None if codebook is None else str(codebook),
    )
    out = out if out is not None else default_report_path(bundle)
    with progress_bar("bench") as progress:
        result, paths = bench_bundle(
            bundle, sequence, config, checkpoint, capture, reference, out, progress
        )
    if as_json:
        report = {k: str(v) for k, v in paths.items()}
        console.print_json(json.dumps({**result.to_dict(), "report": report}))
        raise typer.Exit(result.exit_code)
    console.print(f"sequence   {result.sequence['source']}", highlight=False)
    console.print(f"reference  {result.reference.label}", highlight=False)
    for r in result.runners:
        t, s = r.texture, r.screen
        line = (
            f"[bold]{r.name:<12}[/bold] texture PSNR {t.psnr_mean:.2f} dB (min {t.psnr_min:.2f}) "
            f"tDE {t.tde:.3g} J {t.jitter_ratio:.3f} FE {t.flicker_excess:.3g} "
            f"T-Std {t.t_std:.3g} (FP32 {t.t_std_reference:.3g})"
        )
        if r.codec is not None:
            line += f" | {r.codec.bits_per_frame} bits/frame"
        if s is not None:
            line += f" | screen PSNR {s.psnr_mean:.2f} dB J {s.jitter_ratio:.3f}"
        if r.perceptual is not None:
            line += f" | {r.perceptual.name} {r.perceptual.jod:.3f} JOD ({r.perceptual_space})"
        e2e = r.latency["end_to_end"]
        line += f" | p50 {e2e.p50_ms:.3g} ms p99 {e2e.p99_ms:.3g} ms"
        ratio = result.latency_ratios(r).get("decode")
        if ratio is not None:
            line += f" (decode {ratio:.2f}x ref)"
        console.print(line, highlight=False)
    for name, why in result.skipped.items():
        console.print(f"skipped    {name}: {why}", highlight=False)
    console.print(result.verdict(), style="green" if result.passed else "red", highlight=False)
    if paths:
        console.print(f"report     {paths['html']}")
    raise typer.Exit(result.exit_code)


def _bench_caching(
    bundle: Path,
    sequence: str | None,
    checkpoint: Path | None,
    capture: Path | None,
    refresh: int | None,
    warmup: int,
    iters: int,
    threads: int,
    as_json: bool,
) -> None:
    from avatarq.bench.caching import bench_caching
    from avatarq.bench.sequences import load_sequence
    from avatarq.export.bundle import open_bundle

    opened = open_bundle(bundle)
    seq = load_sequence(
        sequence, opened.manifest.z_dim, checkpoint, capture, opened.manifest.camera
    )
    with progress_bar("bench --caching") as progress:
        result = bench_caching(bundle, seq, refresh, warmup, iters, threads, progress)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    for line in result.lines():
        console.print(line, highlight=False)


@command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path(
        "out/demo"
    ),
    iters: Annotated[
        int, typer.Option(min=1, max=10_000_000, help="Training steps for the synthetic DAM.")
    ] = 400,
) -> None:
    """The whole path on the embedded synthetic avatar: synth, calibrate, export, build, bench.

    Example: avatarq demo --workdir out/demo
    """
    from avatarq.workflows.demo import run_demo

    with progress_bar("demo") as progress:
        result = run_demo(workdir, iters, progress)
    console.rule("synthetic avatar")
    console.print(f"checkpoint  {result.checkpoint}")
    console.print(f"capture     {result.capture_root}")
    console.rule("export (ONNX Runtime vs PyTorch reference)")
    for name, line in result.validations.items():
        console.print(f"{name:<5} {result.bundles[name]}: {line}", highlight=False)
    console.rule("engines for the INT8 bundle")
    for backend, line in result.engines.items():
        console.print(f"{backend:<13} {line}", highlight=False)
    console.rule("bench: INT8 vs FP32 on an ordered clip")
    for line in result.bench_lines:
        console.print(line, highlight=False)
    console.print(f"report      {result.report}")
