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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from avatarq.bench.results import (
    SPACELESS_METRICS,
    STAGES,
    BenchConfig,
    BenchResult,
    FrameStrip,
    RunnerResult,
    bundle_record,
    environment,
)
from avatarq.bench.sequences import BenchSequence
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError, InternalError
from avatarq.measure import PerceptualClip, SequenceAccumulator, evaluate_gates, psnr
from avatarq.measure.latency import LatencyStats
from avatarq.measure.perceptual import require as require_perceptual

TEXTURE_PEAK = 255.0
_REF_KEY = "<reference>"  # cannot clash with a backend name


class BenchRunner(Protocol):
    """What the harness needs of a runner (`avatarq.engines.Runner` satisfies it).

    ``decode(z float32 [B, Z], view float32 [B, 3])`` returns (texture float32
    [B, 3, T, T], vertices float32 [B, V, 3]) in host memory; they may be views of buffers
    that the next call overwrites (the harness copies what it keeps).
    """

    name: str

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any: ...

    def decode(self, z: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
        elif name.startswith("tensorrt") and not _cuda_available():
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
        device = "cuda" if _ort_has_cuda() and _cuda_available() else "cpu"
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


# --------------------------------------------------------------------------- helpers


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class _Denorm:
    """Maps decoder outputs to what is measured: texture in [0, 1] units, vertices in
    capture units (identity scale when the bundle folds the de-normalization in)."""

    tex_mean: np.ndarray | None = None  # float32 [3, T, T], 0..255
    tex_std: float = 1.0
    vert_mean: np.ndarray | None = None  # float32 [V, 3]
    vert_std: float = 1.0
    # texture units per 1.0: 255 for 0..255 textures; None until measured for a bundle whose
    # normalization is unknown (then the reference's first-frame range, as the comparator)
    peak: float | None = TEXTURE_PEAK
    units: str = "0..255 texels / 255"

    def texture(self, tex: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """[B, 3, T, T] decoder units -> [0, 1] units, a new array of ``dtype``."""
        x = tex.astype(dtype, copy=True)
        if self.tex_mean is not None:
            x *= self.tex_std
            x += self.tex_mean
        if self.peak is None:
            raise InternalError("texture peak used before it was measured")
        x /= self.peak
        return x

    def vertices(self, vert: np.ndarray) -> np.ndarray:
        if self.vert_mean is None:
            return np.array(vert, dtype=np.float32, copy=True)
        return vert * np.float32(self.vert_std) + self.vert_mean


def _denorm_for(bundle: Any, capture_root: Path | None) -> _Denorm:
    """Folded: identity; else the bundle's normalization arrays, else the capture's; with
    neither, metrics are taken in normalized units (peak measured on the reference)."""
    m = bundle.manifest
    if m.normalization.folded:
        return _Denorm()
    arrays = bundle.normalization_arrays()
    if arrays is not None:
        return _Denorm(
            arrays["tex_mean"].astype(np.float32),
            float(arrays["tex_std"]),
            arrays["vert_mean"].reshape(-1, 3).astype(np.float32),
            float(arrays["vert_std"]),
        )
    if capture_root is None:
        return _Denorm(peak=None, units="Multiface-normalized units / reference first-frame range")
    import torch

    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import resize_texture

    cap = MultifaceCapture(capture_root)
    mean = resize_texture(torch.from_numpy(cap.tex_mean)[None], m.tex_size)[0].numpy()
    vmean = cap.vert_mean.reshape(-1, 3)
    if vmean.shape[0] != m.n_vertices:
        raise AvatarqError(
            f"capture {capture_root} has {vmean.shape[0]} vertices, bundle {bundle.root} "
            f"{m.n_vertices}"
        )
    return _Denorm(mean.astype(np.float32), cap.tex_std, vmean.astype(np.float32), cap.vert_std)


def _display_texture(tex: np.ndarray) -> np.ndarray:
    """[3, T, T] decoder orientation (row 0 = v 0) -> [T, T, 3] display (row 0 = top)."""
    return np.ascontiguousarray(np.moveaxis(tex, 0, -1)[::-1], dtype=np.float32)


def _crop_box(mask: np.ndarray, margin: float = 0.08) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask > 0)
    h, w = mask.shape
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad = int(math.ceil(margin * max(r1 - r0, c1 - c0)))
    return slice(max(r0 - pad, 0), min(r1 + pad, h)), slice(max(c0 - pad, 0), min(c1 + pad, w))


class _Worst:
    """Keeps the lowest-PSNR frame seen so far (the earliest on ties)."""

    def __init__(self, space: str) -> None:
        self.space = space
        self.strip: FrameStrip | None = None

    def offer(
        self,
        t: int,
        frame_id: str,
        value: float,
        ref: np.ndarray,
        dep: np.ndarray,
        mask: np.ndarray | None = None,
    ) -> None:
        """Frame ``t`` with PSNR ``value``: textures [3, T, T] (decoder orientation), or
        screen images [H, W, 3] with the reference's foreground ``mask`` [H, W]."""
        if self.strip is not None and not value < self.strip.psnr:
            return
        if mask is None:
            ref, dep = _display_texture(ref), _display_texture(dep)
        else:
            box = _crop_box(mask)
            ref, dep, mask = ref[box].copy(), dep[box].copy(), mask[box].copy()
        self.strip = FrameStrip(self.space, t, frame_id, value, ref, dep, mask)


# --------------------------------------------------------------------------- render


@dataclass
class _RenderSetup:
    renderer: Any
    device: Any  # torch.device
    M: np.ndarray  # float32 [T, 3, 4] at the render resolution
    record: dict[str, Any]


def _setup_render(
    bundle: Any, sequence: BenchSequence, config: BenchConfig
) -> tuple[_RenderSetup | None, str | None]:
    """(render setup, None) or (None, why nothing is rendered)."""
    if config.render == "none":
        return None, "rendering off (render none)"
    explicit = config.render != "auto"
    if not sequence.has_camera:
        if explicit:
            raise AvatarqError(
                f"render {config.render} needs a camera, but the sequence ({sequence.source}) "
                "has none; pass a capture (--capture) or --render none"
            )
        return None, "the sequence has no camera (no capture given)"
    if not bundle.topology_path.is_file() and not explicit:
        return None, f"bundle {bundle.root} has no topology.npz"
    topology = bundle.topology()  # AvatarqError naming the fix when missing
    import torch

    from avatarq.render import RenderConfig, Renderer

    resolution = config.resolution or sequence.image_size
    renderer = Renderer(topology, RenderConfig(resolution=resolution, backend=config.render))
    if renderer.backend == "nvdiffrast" or torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    record = {
        "backend": renderer.backend,
        "resolution": list(resolution),
        "camera_image_size": list(sequence.image_size),
        "device": str(device),
        "perspective_correct": renderer.config.perspective_correct,
        "antialias": renderer.config.antialias,
        "mask": "foreground of the FP32 render, per frame",
    }
    return _RenderSetup(renderer, device, sequence.projection_at(resolution), record), None


def _render(setup: _RenderSetup, vert: np.ndarray, tex: np.ndarray, M: np.ndarray) -> Any:
    """Render float32 copies of vertices [B, V, 3], texture [B, 3, T, T], M [B, 3, 4]."""
    import torch

    d, f32 = setup.device, torch.float32
    return setup.renderer.render(
        torch.from_numpy(vert).to(d, f32),
        torch.from_numpy(tex).to(d, f32),
        torch.from_numpy(np.ascontiguousarray(M)).to(d, f32),
    )


# --------------------------------------------------------------------------- timing


def _timing_batches(
    sequence: BenchSequence, setup: _RenderSetup | None, config: BenchConfig
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(z, view, M) of each warm-up and timed iteration: batches taken cyclically."""
    t_len, b = len(sequence), config.batch
    out = []
    for i in range(config.warmup + config.iters):
        idx = [(i * b + k) % t_len for k in range(b)]
        M = None if setup is None else np.ascontiguousarray(setup.M[idx])
        out.append((sequence.z[idx], sequence.view[idx], M))
    return out


def _time_step(
    runner: BenchRunner,
    batch: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    setup: _RenderSetup | None,
    denorm: _Denorm,
) -> dict[str, float]:
    """Milliseconds of each stage of one decode -> copy -> render iteration."""
    import torch

    z, view, M = batch
    cuda = setup is not None and setup.device.type == "cuda"
    clock = time.perf_counter_ns
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    tex, vert = runner.decode(z, view)  # host outputs: the call has finished
    t1 = clock()
    if setup is None:
        return {"decode": (t1 - t0) / 1e6, "end_to_end": (t1 - t0) / 1e6}
    # de-normalization is measurement bookkeeping, not part of the pipeline: not timed
    tex01, vert_c = denorm.texture(tex), denorm.vertices(vert)
    d = setup.device
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
    t2 = clock()
    vt, xt, mt = (torch.from_numpy(a).to(d) for a in (vert_c, tex01, M))
    if cuda:
        events[1].record()
    t3 = clock()
    setup.renderer.render(vt, xt, mt)
    if cuda:
        events[2].record()
        torch.cuda.synchronize()
    t4 = clock()
    if cuda:
        copy_ms = events[0].elapsed_time(events[1])
        render_ms = events[1].elapsed_time(events[2])
    else:
        copy_ms, render_ms = (t3 - t2) / 1e6, (t4 - t3) / 1e6
    return {
        "decode": (t1 - t0) / 1e6,
        "copy": float(copy_ms),
        "render": float(render_ms),
        "end_to_end": ((t1 - t0) + (t4 - t2)) / 1e6,
    }


def _time_runners(
    runners: Mapping[str, BenchRunner],
    sequence: BenchSequence,
    setup: _RenderSetup | None,
    denorm: _Denorm,
    config: BenchConfig,
    progress: Progress | None,
) -> dict[str, dict[str, LatencyStats]]:
    """Per-stage latency of every runner: `config.warmup` untimed iterations each, then
    `config.iters` timed ones, runner after runner, or round-robin with
    `config.interleave` (so that load from other processes hits all runners alike)."""
    batches = _timing_batches(sequence, setup, config)
    warm, timed = batches[: config.warmup], batches[config.warmup :]
    names = list(runners)
    samples = {n: {s: [] for s in STAGES} for n in names}
    for name in names:
        for batch in warm:
            _time_step(runners[name], batch, setup, denorm)
    if config.interleave:
        order = [
            (i, names[(i + k) % len(names)]) for i in range(len(timed)) for k in range(len(names))
        ]
    else:
        order = [(i, n) for n in names for i in range(len(timed))]
    for done, (i, name) in enumerate(order, 1):
        for stage, ms in _time_step(runners[name], timed[i], setup, denorm).items():
            samples[name][stage].append(ms)
        if progress is not None:
            progress("timing", done, len(order))
    return {
        n: {s: LatencyStats.from_samples(ms, batch=config.batch) for s, ms in st.items() if ms}
        for n, st in samples.items()
    }


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
    sequence.check_z_dim(m.z_dim)
    gates = config.parsed_gates()
    perceptual = config.perceptual_config()
    if perceptual is not None:
        require_perceptual(perceptual.metric)  # before any decoding
    capture_root = Path(capture) if capture is not None else sequence.capture_root
    denorm = _denorm_for(bundle, capture_root)
    if perceptual is not None and denorm.peak is None:
        raise AvatarqError(
            f"--perceptual needs textures in display units, but bundle {bundle.root} carries "
            "no normalization arrays and no capture was given; pass --capture CAPTURE"
        )
    setup, render_note = _setup_render(bundle, sequence, config)
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
        worst = {n: (_Worst("texture"), _Worst("screen")) for n in names}
        clips = {n: PerceptualClip(perceptual) for n in names} if perceptual else {}
        if denorm.peak is None:
            first, _ = ref.decode(sequence.z[:1], sequence.view[:1])
            span = float(first.max() - first.min())
            denorm.peak = span if span > 0 and math.isfinite(span) else 1.0
        _fidelity_pass(
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
        latencies = _time_runners(timed, sequence, setup, denorm, config, progress)
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
    ref: BenchRunner,
    runners: Mapping[str, BenchRunner],
    sequence: BenchSequence,
    setup: _RenderSetup | None,
    denorm: _Denorm,
    config: BenchConfig,
    texture_acc: Mapping[str, SequenceAccumulator],
    screen_acc: Mapping[str, SequenceAccumulator],
    worst: Mapping[str, tuple[_Worst, _Worst]],
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
        z, view = sequence.z[start:stop], sequence.view[start:stop]
        f_tex, f_vert = ref.decode(z, view)
        # texture metrics read float64 [0, 1] values (no extra float32 rounding in the
        # measurement); the renderer gets float32 as a deployed pipeline would
        f_tex, f_vert = denorm.texture(f_tex, np.float64), denorm.vertices(f_vert)
        f_img = f_mask = None
        if setup is not None:
            out = _render(setup, f_vert, f_tex, setup.M[start:stop])
            f_img, f_mask = out.image.cpu().numpy(), out.mask.cpu().numpy()
            for i in range(stop - start):
                if not f_mask[i].any():
                    h, w = f_mask.shape[1:]
                    raise AvatarqError(
                        f"frame {sequence.ids[start + i]}: the FP32 mesh covers no pixel of "
                        f"the {h}x{w} render; check the camera and the resolution"
                    )
        for name, runner in runners.items():
            q_tex, q_vert = runner.decode(z, view)
            q_tex, q_vert = denorm.texture(q_tex, np.float64), denorm.vertices(q_vert)
            q_img = None
            if setup is not None:
                q_img = _render(setup, q_vert, q_tex, setup.M[start:stop]).image.cpu().numpy()
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
                    clips[name].add(_display_texture(f_tex[i]), _display_texture(q_tex[i]))
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
    if config.render in ("torch", "nvdiffrast"):
        opened.topology()  # fail before any decoding when rendering cannot happen
    seq = load_sequence(
        sequence, opened.manifest.z_dim, checkpoint, capture, opened.manifest.camera
    )
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
