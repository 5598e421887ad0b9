"""The benchmark harness behind `avatarq bench`: play an ordered sequence through the FP32
reference and each deployed runner, render it, and measure latency, fidelity and temporal
stability exactly as the metrics spec defines them.

What runs:

- **The reference** F, the first that applies: the model.onnx of an FP32
  ``reference_bundle`` exported from the same checkpoint (ONNX Runtime, CPU); with a
  checkpoint, the PyTorch decoder of the checkpoint the bundle was exported from (torch
  runner, FP32, on the CPU so that no TF32 or reduced-precision GPU kernel enters the
  reference; the capture de-normalizes it like the bundle); an FP32 bundle's own
  model.onnx (ONNX Runtime, CPU). A quantized bundle with none of these has no reference:
  AvatarqError. The reference is always run on the CPU.
- **The runners** Q: the `avatarq.engines` backends named in `BenchConfig.runners`; by
  default ``onnx`` (model.onnx as exported) plus every backend whose engine the bundle
  holds and this machine can run.

What is measured, per runner:

- fidelity and temporal stability in **texture space** (the decoded texture in 0..255
  units / 255, every texel; an unfolded bundle is de-normalized with the capture first) and in **screen space** (both rendered through the sequence's camera; every
  mean restricted to the FP32 render's foreground mask of that frame): PSNR and SSIM per
  frame, tDE, J, FE (`avatarq.measure`);
- **latency** per stage after warm-up: ``decode`` (runner call, inputs in host memory to
  outputs in host memory, so it includes the runner's own device copies), ``copy``
  (decoded texture, vertices and M to the render device), ``render``, and ``end_to_end``
  (the sum of the three spans; the measurement's own / 255 scaling between decode and
  copy is not timed). CPU: wall clock. CUDA: the device is synchronized before every
  clock read, and ``copy`` and ``render`` are timed with CUDA events. Without rendering
  ``end_to_end`` equals ``decode``. Runners are timed one after the other, or round-robin
  (`BenchConfig.interleave`).
- optionally a **perceptual** video score in JOD (`BenchConfig.perceptual`:
  FovVideoVDP or ColorVideoVDP, `avatarq.measure.perceptual`) of the runner's clip
  against the reference's, on the rendered frames cropped to the FP32 foreground of the
  first frame (the textures when nothing is rendered), reduced to
  `BenchConfig.perceptual_size` pixels, on the CPU;
- **gates** (`avatarq.measure.gates.parse_gates`) on texture- or screen-space metrics
  (`BenchConfig.gate_space`), one latency stage (`BenchConfig.gate_stage`) and the
  perceptual score (``jod``).

The timed iterations decode batches taken cyclically from the sequence; the fidelity pass
decodes every frame once, untimed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.bench.frames import (
    Denorm,
    RenderSetup,
    Worst,
    cuda_available,
    denorm_for,
    display_texture,
    render,
    setup_render,
)
from avatarq.bench.results import (
    SPACELESS_METRICS,
    BenchConfig,
    BenchResult,
    RunnerResult,
    bundle_record,
    environment,
)
from avatarq.bench.sequences import BenchSequence
from avatarq.bench.timing import BenchRunner, DecodeCall, time_runners
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError
from avatarq.measure import (
    PerceptualClip,
    SequenceAccumulator,
    check_finite,
    evaluate_gates,
    psnr,
)
from avatarq.measure.perceptual import require as require_perceptual

_REF_KEY = "<reference>"  # cannot clash with a backend name


# --------------------------------------------------------------------------- runners


def default_runners(bundle: Any, device: str = "auto") -> tuple[list[str], dict[str, str]]:
    """Backends benchmarked when none are named: (names, {skipped name: why}).

    ``onnx`` (model.onnx as exported) always; then each backend with an engine in the
    bundle, when its Python module is installed and, for TensorRT, a GPU is there.
    """
    from avatarq.engines import get_backend

    names, skipped = ["onnx"], {}
    built = list(dict.fromkeys(e.backend for e in bundle.manifest.engines))
    for name in built:
        try:
            backend = get_backend(name)
        except AvatarqError:
            skipped[name] = "not a backend this avatarq knows"
            continue
        if not backend.available():
            skipped[name] = f"Python module(s) {', '.join(backend.requires)} not installed"
        elif name.startswith("tensorrt") and not cuda_available():
            skipped[name] = "needs a CUDA GPU"
        elif device == "cpu" and name.startswith("tensorrt"):
            skipped[name] = "device cpu"
        else:
            names.append(name)
    return names, skipped


def _run_options(config: BenchConfig, backend: str, **extra: Any) -> Any:
    from avatarq.engines import RunOptions

    # TensorRT engines fix their batch range at build time; the others size buffers freely.
    max_batch = None if backend.startswith("tensorrt") else max(config.batch, 1)
    device = config.device
    if device == "auto" and backend in ("onnx", "onnxruntime"):
        device = "cuda" if _ort_has_cuda() and cuda_available() else "cpu"
    return RunOptions(device=device, threads=config.threads, max_batch=max_batch, **extra)


def _ort_has_cuda() -> bool:
    """Whether this ONNX Runtime has its CUDA provider (onnxruntime-gpu): with the CPU-only
    package a GPU machine still runs ORT runners on the CPU under device auto."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def open_reference(
    bundle: Any,
    config: BenchConfig,
    checkpoint: str | Path | None = None,
    capture: str | Path | None = None,
    reference_bundle: str | Path | None = None,
) -> BenchRunner:
    """The FP32 reference runner (not yet entered); see the module docstring for the order."""
    from avatarq.engines import RunOptions, open_runner
    from avatarq.export.bundle import open_bundle

    m = bundle.manifest
    options = RunOptions(device="cpu", threads=config.threads, max_batch=config.batch)
    if reference_bundle is not None:
        ref = open_bundle(reference_bundle)
        r = ref.manifest
        if r.precision != "fp32":
            raise AvatarqError(
                f"reference bundle {ref.root} is {r.precision}; the reference must be an FP32 "
                "export of the same checkpoint"
            )
        if r.source_checkpoint_sha256 != m.source_checkpoint_sha256:
            raise AvatarqError(
                f"reference bundle {ref.root} was exported from another checkpoint than "
                f"{bundle.root} (source_checkpoint_sha256 differs)"
            )
        if bool(r.normalization.folded) != bool(m.normalization.folded) or (r.camera != m.camera):
            raise AvatarqError(
                f"reference bundle {ref.root} differs from {bundle.root} in de-normalization "
                "or folded camera; export both with the same --capture and --camera"
            )
        return _labelled(open_runner(ref, "onnx", options), f"FP32 {ref.root.name}/model.onnx")
    if checkpoint is not None:
        options = RunOptions(
            device="cpu",
            max_batch=config.batch,
            checkpoint=str(checkpoint),
            capture=None if capture is None else str(capture),
        )
        runner = open_runner(bundle, "torch", options)
        return _labelled(runner, f"FP32 PyTorch decoder of {Path(checkpoint).name}")
    if m.precision == "fp32":
        return _labelled(
            open_runner(bundle, "onnx", options), f"FP32 {bundle.root.name}/model.onnx"
        )
    path = bundle.reference_path()
    if path is None:
        raise AvatarqError(
            f"bundle {bundle.root} is {m.precision} and was exported without its FP32 reference "
            "graph; pass the checkpoint it came from (--checkpoint dam.pt) or an FP32 bundle "
            "(--reference fp32.avq), or re-export it with its reference"
        )
    from avatarq.engines.onnxruntime import OnnxModelRunner

    runner = OnnxModelRunner.for_graph(bundle, path, options)
    return _labelled(runner, f"FP32 {bundle.root.name}/{path.relative_to(bundle.root)}")


def _labelled(runner: Any, what: str) -> Any:
    """Name the reference runner for the report (engines runners keep a plain ``name``)."""
    runner.name = f"{what} ({runner.name})"
    return runner


# --------------------------------------------------------------------------- the run


def run_bench(
    bundle: Any,
    sequence: BenchSequence,
    config: BenchConfig = BenchConfig(),
    progress: Progress | None = None,
    *,
    checkpoint: str | Path | None = None,
    capture: str | Path | None = None,
    reference_bundle: str | Path | None = None,
    reference: BenchRunner | None = None,
    runners: Sequence[BenchRunner] | None = None,
) -> BenchResult:
    """Benchmark a bundle on an ordered sequence (see the module docstring).

    Args:
        bundle: a `Bundle` or its path.
        sequence: what to play (`avatarq.bench.sequences`); its latent size must match.
        config: runners, rendering, timing, gates.
        progress: called as progress(description, done, total).
        checkpoint: the checkpoint the bundle came from: the reference becomes its torch
            decoder.
        capture: capture root: de-normalizes an unfolded bundle and the torch reference
            (default: the sequence's capture).
        reference_bundle: an FP32 bundle of the same checkpoint as the reference.
        reference: a runner object to use as the reference instead (not yet entered).
        runners: runner objects to benchmark instead of `config.runners` (not yet entered).

    Returns:
        BenchResult; `result.exit_code` is 1 when a gate failed.

    Raises:
        AvatarqError: latent size mismatch, rendering asked for but impossible (no
            topology, no camera), no FP32 reference, a runner that cannot open.
    """
    from avatarq.export.bundle import Bundle, open_bundle

    started = time.perf_counter()
    bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    m = bundle.manifest
    call = DecodeCall.for_manifest(m)
    if m.declaration is None:
        sequence.check_z_dim(m.z_dim)
    else:
        sequence.check_inputs(m.inputs)
    gates = config.parsed_gates()
    perceptual = config.perceptual_config()
    capture_root = Path(capture) if capture is not None else sequence.capture_root
    denorm = denorm_for(bundle, capture_root)
    if perceptual is not None and denorm.peak is None:
        raise AvatarqError(
            f"--perceptual needs textures in display units, but bundle {bundle.root} carries "
            "no normalization arrays and no capture was given; pass --capture CAPTURE"
        )
    if perceptual is not None:
        require_perceptual(perceptual.metric)  # before any decoding
    setup, render_note = setup_render(bundle, sequence, config)
    if setup is not None and denorm.peak is None:
        setup, render_note = None, "the bundle's normalization is unknown (export with --capture)"
    if (
        setup is None
        and config.gate_space == "screen"
        and {g.metric for g in gates} - SPACELESS_METRICS
    ):
        raise AvatarqError(
            f"screen-space gates need rendering, but nothing is rendered: {render_note}"
        )

    skipped: dict[str, str] = {}
    # (name, runner not yet entered, whether a runner that cannot open is skipped)
    planned: list[tuple[str, Any, bool]] = []
    if runners is None:
        from avatarq.engines import open_runner

        names = list(config.runners)
        optional = not names  # a default runner that cannot run here is skipped, not fatal
        if optional:
            names, skipped = default_runners(bundle, config.device)
        extra = {}
        if checkpoint is not None:
            extra["checkpoint"] = str(checkpoint)
        if capture_root is not None:
            extra["capture"] = str(capture_root)
        for n in names:
            if n == "torch" and m.precision != "fp32":
                raise AvatarqError(
                    f"runner torch runs the FP32 checkpoint, not this {m.precision} bundle; it "
                    "is the reference with --checkpoint, or bench an FP32 bundle with it"
                )
            options = _run_options(config, n, **(extra if n == "torch" else {}))
            try:
                planned.append((n, open_runner(bundle, n, options), optional))
            except AvatarqError as exc:
                if not optional:
                    raise
                skipped[n] = str(exc)
    else:
        labels = [getattr(r, "name", f"runner{i}") for i, r in enumerate(runners)]
        if len(set(labels)) != len(labels):
            labels = [f"{n}#{i}" for i, n in enumerate(labels)]
        planned = [(n, r, False) for n, r in zip(labels, runners, strict=True)]
    if reference is None:
        reference = open_reference(bundle, config, checkpoint, capture_root, reference_bundle)

    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(reference)
        names, active = [], []
        for name, runner, optional in planned:
            try:
                active.append(stack.enter_context(runner))
            except AvatarqError as exc:
                if not optional:
                    raise
                skipped[name] = str(exc)
                continue
            names.append(name)
        if not names:
            raise AvatarqError(
                "no runner could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        texture_acc = {n: SequenceAccumulator(None, config.compute_ssim) for n in names}
        screen_acc = {n: SequenceAccumulator(None, config.compute_ssim) for n in names}
        worst = {n: (Worst("texture"), Worst("screen")) for n in names}
        clips = {n: PerceptualClip(perceptual) for n in names} if perceptual else {}
        if denorm.peak is None:
            first, _ = call(ref, sequence.feeds(slice(0, 1)))
            check_finite(first, getattr(ref, "name", "reference"), "texture")
            span = float(first.max() - first.min())
            denorm.peak = span if span > 0 and math.isfinite(span) else 1.0
        _fidelity_pass(
            call,
            ref,
            dict(zip(names, active, strict=True)),
            sequence,
            setup,
            denorm,
            config,
            texture_acc,
            screen_acc,
            worst,
            progress,
            clips,
        )
        scores = {}
        for done, (name, clip) in enumerate(clips.items(), 1):
            scores[name] = clip.result()
            if progress is not None:
                progress(f"perceptual ({perceptual.metric})", done, len(clips))
        ref_label = getattr(ref, "name", "reference")
        timed = {_REF_KEY: ref, **dict(zip(names, active, strict=True))}
        latencies = time_runners(timed, sequence, setup, denorm, config, progress, call)
        ref_latency = latencies[_REF_KEY]
        results = []
        for name, runner in zip(names, active, strict=True):
            latency = latencies[name]
            texture = texture_acc[name].result()
            screen = screen_acc[name].result() if setup is not None else None
            result = RunnerResult(name, getattr(runner, "name", name), latency, texture, screen)
            if name in scores:
                result.perceptual = scores[name]
                result.perceptual_space = "screen" if setup is not None else "texture"
            if gates:
                result.gates = evaluate_gates(
                    gates, result.gate_values(config.gate_space, config.gate_stage)
                )
            results.append(result)

    strips = {n: [w.strip for w in worst[n] if w.strip is not None] for n in names}
    render_record = setup.record if setup is not None else {"backend": None, "note": render_note}
    return BenchResult(
        config=config,
        bundle=bundle_record(bundle),
        sequence={
            **sequence.describe(),
            "texture_units": denorm.units,
            "texture_peak": denorm.peak,
        },
        render=render_record,
        reference=RunnerResult("reference", ref_label, ref_latency),
        runners=results,
        environment=environment(),
        skipped=skipped,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
        strips=strips,
    )


def _fidelity_pass(
    call: DecodeCall,
    ref: BenchRunner,
    runners: Mapping[str, BenchRunner],
    sequence: BenchSequence,
    setup: RenderSetup | None,
    denorm: Denorm,
    config: BenchConfig,
    texture_acc: Mapping[str, SequenceAccumulator],
    screen_acc: Mapping[str, SequenceAccumulator],
    worst: Mapping[str, tuple[Worst, Worst]],
    progress: Progress | None,
    clips: Mapping[str, PerceptualClip] | None = None,
) -> None:
    """Decode every frame with the reference and each runner in lock step and accumulate
    the comparisons; only one batch of frames is held at a time (``clips`` keep reduced
    copies for the perceptual score: screen frames when rendered, else textures)."""
    clips = clips or {}
    t_len, b = len(sequence), config.batch
    for start in range(0, t_len, b):
        stop = min(start + b, t_len)
        feeds = sequence.feeds(slice(start, stop))
        f_tex, f_vert = call(ref, feeds)
        who = getattr(ref, "name", "reference")
        check_finite(f_tex, who, call.texture, start)
        if f_vert is not None:
            check_finite(f_vert, who, "vertices", start)
            f_vert = denorm.vertices(f_vert)
        # texture metrics read float64 [0, 1] values (no extra float32 rounding in the
        # measurement); the renderer gets float32 as a deployed pipeline would
        f_tex = denorm.texture(f_tex, np.float64)
        f_img = f_mask = None
        if setup is not None:
            out = render(setup, f_vert, f_tex, setup.M[start:stop])
            f_img, f_mask = out.image.cpu().numpy(), out.mask.cpu().numpy()
            for i in range(stop - start):
                if not f_mask[i].any():
                    h, w = f_mask.shape[1:]
                    raise AvatarqError(
                        f"frame {sequence.ids[start + i]}: the FP32 mesh covers no pixel of "
                        f"the {h}x{w} render; check the camera and the resolution"
                    )
        for name, runner in runners.items():
            q_tex, q_vert = call(runner, feeds)
            check_finite(q_tex, name, call.texture, start)
            if q_vert is not None:
                check_finite(q_vert, name, "vertices", start)
                q_vert = denorm.vertices(q_vert)
            q_tex = denorm.texture(q_tex, np.float64)
            q_img = None
            if setup is not None:
                q_img = render(setup, q_vert, q_tex, setup.M[start:stop]).image.cpu().numpy()
            for i in range(stop - start):
                t = start + i
                fid = sequence.ids[t]
                texture_acc[name].add(f_tex[i], q_tex[i])
                worst[name][0].offer(t, fid, psnr(f_tex[i], q_tex[i]), f_tex[i], q_tex[i])
                if setup is not None:
                    m = f_mask[i][None]
                    fi, qi = np.moveaxis(f_img[i], -1, 0), np.moveaxis(q_img[i], -1, 0)
                    screen_acc[name].add(fi, qi, m)
                    worst[name][1].offer(t, fid, psnr(fi, qi, m), f_img[i], q_img[i], f_mask[i])
                    if name in clips:
                        clips[name].add(f_img[i], q_img[i], f_mask[i])
                elif name in clips:
                    clips[name].add(display_texture(f_tex[i]), display_texture(q_tex[i]))
            if progress is not None:
                progress(f"fidelity {name}", stop, t_len)


# --------------------------------------------------------------------------- one call


def bench_bundle(
    bundle: str | Path,
    sequence: str | Path | None = None,
    config: BenchConfig = BenchConfig(),
    checkpoint: str | Path | None = None,
    capture: str | Path | None = None,
    reference_bundle: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[BenchResult, dict[str, Path]]:
    """What `avatarq bench` does: resolve the sequence, run, write the report.

    Args:
        bundle: bundle directory.
        sequence: ``CAPTURE:SEGMENT[:CAMERA]``, a latent .npz, or None (default clip; see
            `avatarq.bench.sequences.load_sequence`).
        config: `BenchConfig`.
        checkpoint, capture, reference_bundle: see `run_bench`; the checkpoint also encodes
            capture segments.
        out: report directory (report.json, report.html); None writes nothing.
        progress: progress(description, done, total).

    Returns:
        (result, {"json": path, "html": path} or {} without ``out``).
    """
    from avatarq.bench.sequences import load_sequence
    from avatarq.export.bundle import open_bundle

    opened = open_bundle(bundle)
    if out is not None:
        from avatarq.bench.report import check_report_dir

        check_report_dir(Path(out))  # refuse a bad report folder before any decoding
    if config.render in ("torch", "nvdiffrast"):
        opened.topology()  # fail before any decoding when rendering cannot happen
    z_dim = opened.manifest.z_dim if opened.manifest.declaration is None else None
    seq = load_sequence(sequence, z_dim, checkpoint, capture, opened.manifest.camera)
    result = run_bench(
        opened,
        seq,
        config,
        progress,
        checkpoint=checkpoint,
        capture=capture,
        reference_bundle=reference_bundle,
    )
    paths: dict[str, Path] = {}
    if out is not None:
        from avatarq.bench.report import write_report

        paths = write_report(result, out)
    return result, paths
