"""The `avatarq` command line: thin commands that parse, call one library function, print."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from avatarq import __version__
from avatarq.core.documents import document_dict
from avatarq.errors import AvatarqError

app = typer.Typer(
    name="avatarq",
    help="Deployment compiler for codec-avatar decoders: export, quantize (POCA), build, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn an AvatarqError into one line on stderr and exit code 2 (AVATARQ_DEBUG=1: raise)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AvatarqError as exc:
            if os.environ.get("AVATARQ_DEBUG"):
                raise
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def _version(value: bool) -> None:
    if value:
        console.print(f"avatarq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """avatarq: calibrate, export, build and benchmark codec-avatar decoders."""


@app.command()
@user_errors
def info(
    model: Annotated[Path, typer.Argument(help="A Multiface-format DAM checkpoint (.pt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What a checkpoint is: arch, sizes and parameter counts.

    Example: avatarq info dam.pt
    """
    from avatarq.models.inspect import describe_checkpoint

    described = describe_checkpoint(model)
    if as_json:
        console.print_json(json.dumps(described))
        return
    c = described["config"]
    console.print(f"[bold]{model}[/bold]: Multiface DAM, arch [bold]{c['arch']}[/bold]")
    console.print(
        f"  z {c['z_dim']}, texture {c['tex_size']}x{c['tex_size']}, {c['n_vertices']} vertices, "
        f"{c['n_cams']} cameras, encoder {'yes' if c['has_encoder'] else 'no'}"
    )
    for name, count in described["parameters"].items():
        console.print(f"  {name:<10} {count:>12,} parameters")
    console.print(
        f"  decoder as deployed: {described['deployed_parameters']:,} parameters "
        f"({described['deployed_fp32_mb']:.1f} MB fp32)"
    )


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory (capture/ and dam.pt).")],
    texture_size: Annotated[int, typer.Option(help="Capture texture size.")] = 1024,
    model_texture_size: Annotated[int, typer.Option(help="Texture size of the trained DAM.")] = 256,
    z_dim: Annotated[int, typer.Option(help="Latent size of the trained DAM.")] = 64,
    arch: Annotated[str, typer.Option(help="DAM variant to train.")] = "base",
    iters: Annotated[int, typer.Option(help="Training steps.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed of capture and training.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if a cached avatar matches.")] = False,
) -> None:
    """Make the embedded synthetic avatar: a Multiface-layout capture and a DAM trained on it.

    Example: avatarq synth out/synth
    """
    from avatarq.data.synthetic import make_synthetic_avatar
    from avatarq.data.synthetic_capture import SyntheticCaptureConfig
    from avatarq.data.train import TrainConfig

    avatar = _synth(
        out,
        SyntheticCaptureConfig(seed=seed, texture_size=texture_size),
        TrainConfig(arch=arch, z_dim=z_dim, tex_size=model_texture_size, iters=iters, seed=seed),
        force,
        make_synthetic_avatar,
    )
    training = avatar.record["training"]
    state = "reused cached avatar" if avatar.reused else f"trained in {training['seconds']} s"
    console.print(f"capture     {avatar.capture_root}")
    console.print(
        f"checkpoint  {avatar.checkpoint}  ({state}, final loss {training['final_loss']:.4f})"
    )


def _synth(out, capture_config, train_config, force, make):  # noqa: ANN001
    with _progress() as progress:
        task = progress.add_task("synthetic avatar", total=train_config.iters)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"training (loss {loss:.4f})")

        def say(message: str) -> None:
            progress.update(task, description=message)

        return make(out, capture_config, train_config, force=force, say=say, train_progress=on_step)


@app.command()
@user_errors
def calibrate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Multiface-format DAM checkpoint.")],
    data: Annotated[Path, typer.Option(help="Capture root or latent-sequence .npz.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration artifact directory.")],
    capture: Annotated[
        Path | None,
        typer.Option(
            help="Capture root for normalization and cameras (default: --data if a capture)."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="poca or max (standard PTQ, no masks).")] = "poca",
    tau: Annotated[
        float,
        typer.Option(
            help="Std-mask threshold: fraction of positions dropped (POCA ships 0.9; "
            "0 measured best on the synthetic avatar, see docs/benchmarks.md)."
        ),
    ] = 0.0,
    bits: Annotated[int, typer.Option(help="Bit width of weights and activations (8 or 6).")] = 8,
    iters: Annotated[int, typer.Option(help="Adam iterations per layer (upper bound).")] = 100,
    samples: Annotated[int, typer.Option(help="Random (frame, camera) samples.")] = 64,
    temporal_weight: Annotated[float, typer.Option(help="Weight of the temporal term.")] = 0.0,
    adaround: Annotated[bool, typer.Option(help="Learn weight rounding (AdaRound).")] = False,
    asymmetric: Annotated[
        bool, typer.Option(help="Asymmetric activations (ONNX Runtime targets only).")
    ] = False,
    fp16_budget: Annotated[int, typer.Option(help="Most sensitive layers kept in FP16.")] = 0,
    precision: Annotated[
        str | None, typer.Option(help="Overrides, e.g. 'dec.mesh_fc=fp16,dec.z_fc=int8'.")
    ] = None,
    camera: Annotated[
        int | None, typer.Option(help="Camera whose colour correction is folded in.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of samples and optimisation.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Calibrate a decoder with POCA and write the calibration artifact.

    Example: avatarq calibrate --model dam.pt --data capture/ -o calib/
    """
    from avatarq.calibration import CalibrationConfig, parse_precision
    from avatarq.calibration.from_files import calibrate_decoder
    from avatarq.models.checkpoint import load_checkpoint

    config = CalibrationConfig(
        method=method,
        tau=tau,
        bits=bits,
        iters=iters,
        temporal_weight=temporal_weight,
        adaround=adaround,
        symmetric=not asymmetric,
        fp16_budget=fp16_budget,
        precision=parse_precision(precision) if precision else {},
        seed=seed,
    )
    loaded = load_checkpoint(model)
    with _progress() as progress:
        task = progress.add_task("calibrate", total=None)

        def on_progress(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        _, artifact = calibrate_decoder(loaded, data, capture, config, samples, camera, on_progress)
    artifact.save(out)
    plan = artifact.precision
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "out": str(out),
                    "precision": plan,
                    "layers": [layer.to_json() for layer in artifact.layers],
                }
            )
        )
        return
    counts = {p: list(plan.values()).count(p) for p in sorted(set(plan.values()))}
    console.print(
        f"calibration {out}  ({method}, tau {tau}, {bits}-bit; "
        + ", ".join(f"{n} {p}" for p, n in counts.items())
        + " layers)"
    )


@app.command()
@user_errors
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Multiface-format DAM checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    capture: Annotated[
        Path | None,
        typer.Option(help="Capture root: folds de-normalization in, adds topology, real codes."),
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="FP16 graph with FP32 inputs/outputs.")
    ] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="INT8/mixed graph with Q/DQ nodes from a calibration.")
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(help="Calibration artifact (avatarq calibrate); omitted: calibrate now."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Capture root or latents .npz for on-the-fly calibration."),
    ] = None,
    conv_transpose_axis: Annotated[
        str, typer.Option(help="ConvTranspose weight-scale axis: 1, 0 or tensor.")
    ] = "1",
    camera: Annotated[
        int | None, typer.Option(help="Fold this camera's colour correction in.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Upper bound of the dynamic batch.")] = 64,
    validate: Annotated[
        bool, typer.Option(help="Check the graph against PyTorch with ORT.")
    ] = True,
    force: Annotated[
        bool, typer.Option(help="Replace an existing avatarq bundle at the output path.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Trace a decoder to ONNX and write a validated bundle.

    Example: avatarq export --model dam.pt --capture capture/ --int8 -o dam_int8.avq
    """
    from avatarq.export import ExportOptions, export_bundle

    axes = {"1": 1, "0": 0, "tensor": None}
    if conv_transpose_axis not in axes:
        raise AvatarqError(
            f"--conv-transpose-axis must be 1, 0 or tensor, got {conv_transpose_axis!r}"
        )
    if (calib is not None or data is not None) and not int8:
        raise AvatarqError("--calib and --data go with --int8")
    options = ExportOptions(
        fp16=fp16,
        camera=camera,
        max_batch=max_batch,
        validate=validate,
        int8=int8,
        calib=None if calib is None else str(calib),
        calib_data=None if data is None else str(data),
        conv_transpose_axis=axes[conv_transpose_axis],
    )
    with _progress() as progress:
        task = progress.add_task("export", total=None)
        result = export_bundle(
            model, out, capture, options, lambda m: progress.update(task, description=m), force
        )
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "bundle": str(result.bundle.root),
                    "validation": result.validation.to_dict() if result.validation else None,
                }
            )
        )
        return
    console.print(f"bundle      {result.bundle.root}  ({result.bundle.manifest.precision})")
    if result.validation is not None:
        reference = "fake-quant" if int8 else "PyTorch"
        console.print(f"validation  ORT vs {reference}: {result.validation.summary()}")
    validation = result.bundle.manifest.validation
    if validation is not None and validation.vs_fp32 is not None:
        console.print(
            f"vs FP32     texture PSNR {validation.vs_fp32.texture_psnr_db:.1f} dB, "
            f"max|err| {validation.vs_fp32.texture_max_abs_error:.3g}"
        )


@app.command()
@user_errors
def build(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `avatarq export`.")],
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="onnxruntime, tensorrt-rtx or tensorrt.")
    ] = "onnxruntime",
    max_batch: Annotated[int, typer.Option(help="Largest batch (TensorRT profile max).")] = 8,
    opt_batch: Annotated[int, typer.Option(help="Batch TensorRT tunes for.")] = 1,
    min_batch: Annotated[int, typer.Option(help="Smallest batch of the TensorRT profile.")] = 1,
    opt_level: Annotated[
        int, typer.Option("--opt-level", help="TensorRT builder optimization level 0..5.")
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
    latents: Annotated[
        Path | None,
        typer.Option(help="onnxruntime: latent-sequence .npz for the build's accuracy check."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Build an engine for a bundle and record it in its manifest.

    Example: avatarq build dam.avq --backend tensorrt-rtx
    """
    from avatarq.engines import BuildOptions, build_engine

    options = BuildOptions(
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        optimization_level=opt_level,
        compute_capabilities=tuple(compute_capability or ()),
        timing_cache=timing_cache,
        ort_rewrite=rewrite,
        calibration_latents=None if latents is None else str(latents),
    )
    with _progress() as progress:
        task = progress.add_task(f"build {backend}", total=None)
        record = build_engine(
            bundle, backend, options, lambda m: progress.update(task, description=m)
        )
    if as_json:
        console.print_json(json.dumps({"bundle": str(bundle), "engine": document_dict(record)}))
        return
    _print_engine(bundle, record)


def _print_engine(bundle: Path, record) -> None:  # noqa: ANN001 - an engine record
    console.print(
        f"engine      {bundle / record.path}  ({record.backend} {record.library_version}, "
        f"target {record.target}, {record.size_bytes / 1e6:.1f} MB, {record.build_seconds:.1f} s)"
    )
    rewrite = getattr(record, "rewrite", None)
    if rewrite is not None:
        modes = [layer.mode for layer in rewrite.layers]
        console.print(
            f"rewrite     {modes.count('int8')} int8 / {modes.count('float')} float / "
            f"{modes.count('kept')} kept ConvTranspose layers"
        )
    check = getattr(record, "check", None)
    if check is not None:
        console.print(
            f"check       vs model.onnx: texture max|err| {check.texture_max_abs_error:.3g}, "
            f"PSNR {check.texture_psnr_db:.1f} dB (worst input {check.texture_psnr_min_db:.1f} dB)"
        )
    if getattr(record, "layers", None):
        console.print(f"layers      {bundle / record.layers}")


@app.command()
@user_errors
def compare(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    reference: Annotated[
        str, typer.Option(help="Reference backend: onnx (model.onnx as exported), torch, ...")
    ] = "onnx",
    candidate: Annotated[
        str, typer.Option(help="Candidate backend; auto = the best engine built for here.")
    ] = "auto",
    latents: Annotated[
        Path | None, typer.Option(help="Latent-sequence .npz (z, view); default: seeded.")
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames of the seeded sequence.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the seeded sequence.")] = 0,
    batch: Annotated[int, typer.Option(help="Frames per decode call.")] = 1,
    checkpoint: Annotated[
        Path | None, typer.Option(help="torch backend: the checkpoint the bundle came from.")
    ] = None,
    capture: Annotated[
        Path | None, typer.Option(help="torch backend: capture root (folded normalization).")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="torch candidate in float16.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: default).")] = 0,
    min_psnr: Annotated[
        float | None, typer.Option(help="Fail (exit 1) below this mean PSNR, dB.")
    ] = None,
    max_jitter: Annotated[
        float | None, typer.Option(help="Fail (exit 1) above this jitter ratio J.")
    ] = None,
    ssim: Annotated[bool, typer.Option(help="Compute SSIM per frame.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run two backends on the same ordered inputs; print errors, PSNR and temporal metrics.

    Example: avatarq compare dam.avq --reference onnx --candidate onnxruntime
    """
    from avatarq.engines import RunOptions
    from avatarq.engines.compare import compare_bundle
    from avatarq.measure import Tolerances

    common = {
        "device": device,
        "threads": threads,
        "max_batch": batch,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "capture": None if capture is None else str(capture),
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


def _resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise AvatarqError(
            f"--resolution must be HxW in pixels, e.g. 1024x667; got {text!r}"
        ) from None
    return h, w


@app.command()
@user_errors
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from avatarq export).")],
    sequence: Annotated[
        str | None,
        typer.Option(
            help="CAPTURE:SEGMENT[:CAMERA], a latent .npz, or omitted: the capture's first "
            "segment (with --capture and --checkpoint) or a smooth synthetic latent clip."
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
        typer.Option("--out", "-o", help="Report directory (report.json, report.html)."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint the bundle came from: encodes capture segments and becomes "
            "the FP32 reference (torch)."
        ),
    ] = None,
    capture: Annotated[
        Path | None, typer.Option(help="Capture root: cameras and de-normalization.")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="An FP32 bundle of the same checkpoint as the reference.")
    ] = None,
    resolution: Annotated[
        str | None, typer.Option(help="Render size HxW (default: the camera's image size).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed iterations per runner.")] = 3,
    iters: Annotated[int, typer.Option(help="Timed iterations per runner.")] = 20,
    batch: Annotated[int, typer.Option(help="Frames per decode call.")] = 1,
    gate_space: Annotated[
        str, typer.Option(help="Fidelity gates read texture or screen metrics.")
    ] = "texture",
    ssim: Annotated[bool, typer.Option(help="Compute SSIM per frame (slow on big frames).")] = True,
    interleave: Annotated[
        bool, typer.Option(help="Time runners round-robin (fairer ratios on a busy machine).")
    ] = False,
    device: Annotated[str, typer.Option(help="Where runners run: auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: its default).")] = 0,
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
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Benchmark a bundle: latency, fidelity and temporal stability vs FP32, with gates.

    Example: avatarq bench dam_int8.avq --checkpoint dam.pt --capture capture/ --gate 'psnr>=40,J<=0.5' -o report/
    """
    from avatarq.bench import BenchConfig, bench_bundle

    config = BenchConfig(
        runners=tuple(runner or ()),
        render=render,
        resolution=_resolution(resolution),
        warmup=warmup,
        iters=iters,
        batch=batch,
        gates=tuple(gate or ()),
        compute_ssim=ssim,
        gate_space=gate_space,
        interleave=interleave,
        device=device,
        threads=threads,
        perceptual=perceptual,
        perceptual_display=perceptual_display,
        perceptual_size=perceptual_size,
        frame_rate=frame_rate,
    )
    with _progress() as progress:
        task = progress.add_task("bench", total=None)

        def on_progress(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        result, paths = bench_bundle(
            bundle, sequence, config, checkpoint, capture, reference, out, on_progress
        )
    if as_json:
        report = {k: str(v) for k, v in paths.items()}
        console.print_json(json.dumps({**result.to_dict(), "report": report}))
        raise typer.Exit(result.exit_code)
    _print_bench(result, paths)
    raise typer.Exit(result.exit_code)


def _print_bench(result, paths: dict) -> None:  # noqa: ANN001
    console.print(f"sequence   {result.sequence['source']}")
    console.print(f"reference  {result.reference.label}")
    for r in result.runners:
        t, s = r.texture, r.screen
        line = (
            f"[bold]{r.name:<12}[/bold] texture PSNR {t.psnr_mean:.2f} dB (min {t.psnr_min:.2f}) "
            f"tDE {t.tde:.3g} J {t.jitter_ratio:.3f} FE {t.flicker_excess:.3g}"
        )
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
        console.print(f"skipped    {name}: {why}")
    console.print(result.verdict(), style="green" if result.passed else "red", highlight=False)
    if paths:
        console.print(f"report     {paths['html']}")


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path(
        "out/demo"
    ),
    iters: Annotated[int, typer.Option(help="Training steps for the synthetic DAM.")] = 400,
) -> None:
    """The whole path on the embedded synthetic avatar: synth, calibrate, export, build, bench.

    Example: avatarq demo --workdir out/demo
    """
    from avatarq.workflows.demo import run_demo

    with _progress() as progress:
        task = progress.add_task("demo", total=None)
        result = run_demo(workdir, iters, lambda m: progress.update(task, description=m))
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AvatarqError as exc:  # errors raised outside a command body (e.g. in callbacks)
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)
