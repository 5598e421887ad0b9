"""Measurement helpers of the GPU check: clocks, latency rows, the full-size decoder and the
render scene.

Everything here takes a torch device, so the same code runs on CUDA (the check) and on the
CPU (the suite's tests, at small sizes). Timing rules (metrics spec): warm up first; on a
GPU time with CUDA events or synchronize before each clock read; never time a launch.
All times are milliseconds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avatarq.measure.latency import CudaEventTimer, LatencyStats, time_callable
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder
from avatarq.render import CAPTURE_RESOLUTION, Topology

FULL_SIZE = DAMConfig()
"""Multiface's base decoder: z 256, texture 1024^2, 7306 vertices, 40 cameras."""

HEAD_RINGS, HEAD_SECTORS = 83, 88
"""(rings) x sectors + 2 poles = 7306 vertices, the Multiface mesh size."""


# --------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Timing:
    """How one latency is measured.

    Attributes:
        warmup: untimed calls first (cuDNN autotuning, TensorRT-RTX JIT, allocator).
        iters: most timed calls.
        min_iters: fewest timed calls, whatever ``seconds`` says.
        seconds: time one measurement may take; iterations are cut to fit it, estimated
            from three calls after the warm-up.
    """

    warmup: int = 10
    iters: int = 100
    min_iters: int = 20
    seconds: float = 3.0


class Deadline:
    """A point in time (``time.monotonic()`` seconds) that a part must finish by."""

    def __init__(self, seconds_from_now: float) -> None:
        self.at = time.monotonic() + seconds_from_now

    def left(self) -> float:
        return self.at - time.monotonic()

    def spent(self, need: float) -> str | None:
        """A skip reason when fewer than ``need`` seconds are left, else None."""
        left = self.left()
        if left < need:
            return f"part budget spent ({max(left, 0.0):.0f} s left, this step needs ~{need:.0f} s)"
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, timing: Timing, clock: str = "wall"
) -> list[float]:
    """Milliseconds of each timed call of ``fn`` after ``timing.warmup`` untimed calls.

    Args:
        fn: the work; on CUDA it may return before the GPU is done.
        device: where ``fn`` works (CUDA: synchronized around every wall-clock read).
        clock: "events" (CUDA events on the current stream: for work queued on it, as
            torch's) or "wall" (perf_counter with a device synchronize before each read:
            for work on other streams or that synchronizes itself, as ORT and TensorRT).
    """
    if clock not in ("events", "wall"):
        raise ValueError(f"clock must be 'events' or 'wall', got {clock!r}")
    if clock == "events" and device.type != "cuda":
        clock = "wall"
    for _ in range(timing.warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    estimate = max((time.perf_counter() - start) / 3, 1e-6)
    iters = int(min(timing.iters, max(timing.min_iters, timing.seconds // estimate)))
    if clock == "events":
        return CudaEventTimer(device).time(fn, 0, iters)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return time_callable(fn, 0, iters, sync=sync)


def latency_row(samples_ms: Sequence[float], batch: int, **labels: Any) -> dict[str, Any]:
    """One table row: the labels, then n, p50/p90/p99/mean (ms) and frames per second."""
    stats = LatencyStats.from_samples(samples_ms, batch)
    return {
        **labels,
        "batch": batch,
        "n": stats.n,
        "p50_ms": round(stats.p50_ms, 4),
        "p90_ms": round(stats.p90_ms, 4),
        "p99_ms": round(stats.p99_ms, 4),
        "mean_ms": round(stats.mean_ms, 4),
        "fps": round(stats.frames_per_second, 1),
    }


def skipped_row(reason: str, batch: int, **labels: Any) -> dict[str, Any]:
    return {**labels, "batch": batch, "skipped": reason}


class Rows(list):
    """A list of table rows that hands each new row to ``emit`` too (to save it at once)."""

    def __init__(self, emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.emit = emit

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.emit is not None:
            self.emit(row)


def psnr_db(x: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of ``x`` against ``reference`` with the reference's peak-to-peak range as peak."""
    x = np.asarray(x, np.float64)
    reference = np.asarray(reference, np.float64)
    mse = float(np.mean((x - reference) ** 2))
    peak = float(reference.max() - reference.min())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


# --------------------------------------------------------------------------- decoder


def decoder_model(config: DAMConfig = FULL_SIZE, seed: int = 0) -> DeepAppearanceModel:
    """A DAM with seeded random weights (latency does not depend on the weights)."""
    torch.manual_seed(seed)
    return DeepAppearanceModel(config).eval()


def decoder_inputs(config: DAMConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(z float32 [B, Z] ~ N(0, 1), view float32 [B, 3] = frontal) with a fixed seed."""
    z = np.random.default_rng(seed).standard_normal((batch, config.z_dim)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (batch, 1))
    return z, view


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Capture ``fn`` (static inputs) in a CUDA graph and return its replay.

    Warms up on a side stream first, as torch's documentation prescribes, so lazy
    initialization (cuDNN handles, workspaces) happens outside the capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def torch_decode_rows(
    decoder: DeployableDecoder,
    device: torch.device,
    batches: Sequence[int],
    precisions: Sequence[str],
    timing: Timing,
    deadline: Deadline,
    graphs: bool = True,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Latency of the decoder in torch with inputs and outputs on ``device``.

    One row per precision ("fp32"/"fp16"), mode ("eager", and "cuda graph" on CUDA when
    ``graphs``) and batch; CUDA times are CUDA events on the current stream. FP16 rows also
    carry the texture PSNR against FP32 on the same inputs (a sanity check, not a metric).
    """
    rows = Rows(emit)
    config = decoder.config
    reference: dict[int, torch.Tensor] = {}
    clock = "events" if device.type == "cuda" else "wall"
    for precision in precisions:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        model = copy.deepcopy(decoder).to(device=device, dtype=dtype).eval()
        for batch in batches:
            labels = {"runtime": "torch", "precision": precision, "io": "device", "clock": clock}
            reason = deadline.spent(5.0)
            if reason:
                rows.append(skipped_row(reason, batch, mode="eager", **labels))
                continue
            z, view = (torch.from_numpy(a).to(device, dtype) for a in decoder_inputs(config, batch))
            with torch.inference_mode():
                texture = model(z, view)[0]
                if precision == "fp32":
                    reference[batch] = texture.float().cpu()
                extra = {}
                if batch in reference and precision != "fp32":
                    extra["psnr_vs_fp32_db"] = round(
                        psnr_db(texture.float().cpu().numpy(), reference[batch].numpy()), 2
                    )

                def run(model=model, z=z, view=view):
                    return model(z, view)

                samples = measure(run, device, timing, clock)
                rows.append(latency_row(samples, batch, mode="eager", **labels, **extra))
                if graphs and device.type == "cuda":
                    reason = deadline.spent(5.0)
                    if reason:
                        rows.append(skipped_row(reason, batch, mode="cuda graph", **labels))
                        continue
                    replay = cuda_graph(run)
                    samples = measure(replay, device, timing, clock)
                    rows.append(latency_row(samples, batch, mode="cuda graph", **labels))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return list(rows)


def runner_rows(
    runner: Any,
    config: DAMConfig,
    batches: Sequence[int],
    device: torch.device,
    timing: Timing,
    deadline: Deadline,
    labels: dict[str, Any],
    reference: np.ndarray | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """End-to-end latency of an active avatarq runner: numpy in, numpy out (host I/O).

    ``runner.decode`` returns when its outputs are in host memory, so the wall clock is
    right. With ``reference`` (texture [1, 3, T, T] of `decoder_inputs(config, 1)`), the
    batch-1 row carries the texture PSNR against it.
    """
    rows = Rows(emit)
    for batch in batches:
        reason = deadline.spent(5.0)
        if reason:
            rows.append(skipped_row(reason, batch, io="host", **labels))
            continue
        z, view = decoder_inputs(config, batch)
        texture = runner.decode(z, view)[0]
        extra = {}
        if reference is not None and batch == reference.shape[0]:
            extra["psnr_vs_reference_db"] = round(psnr_db(texture, reference), 2)
        samples = measure(lambda z=z, view=view: runner.decode(z, view), device, timing, "wall")
        rows.append(latency_row(samples, batch, io="host", clock="wall", **labels, **extra))
    return list(rows)


# --------------------------------------------------------------------------- ONNX Runtime


def ort_device_io(session: Any, feeds: dict[str, np.ndarray], device: str) -> Callable[[], Any]:
    """A call running ``session`` with inputs and outputs bound on ``device`` ("cuda"/"cpu").

    Inputs are copied to the device once; outputs are preallocated there, so a call is the
    graph alone. ORT's ``run_with_iobinding`` returns after its stream is synchronized.
    """
    import onnxruntime as ort

    batch = next(iter(feeds.values())).shape[0]
    binding = session.io_binding()
    keep = []
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
        keep.append(value)
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        shape = [d if isinstance(d, int) else batch for d in out.shape]
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, 0)
        keep.append(value)
        binding.bind_ortvalue_output(out.name, value)

    def run(binding=binding, keep=keep):
        session.run_with_iobinding(binding)

    return run


# --------------------------------------------------------------------------- render scene


@dataclass(frozen=True)
class HeadScene:
    """A head-sized closed mesh in front of a Multiface-like camera.

    Attributes:
        topology: triangles and a cylindrical UV atlas (seam column duplicated in ``uvs``).
        vertices: float32 [V, 3] head-local positions in mm (x right, y up, z to the camera).
        M: float32 [3, 4] pixel projection K [R | t] of a camera 1 m in front of the head.
        resolution: (H, W) of the image.
    """

    topology: Topology
    vertices: np.ndarray
    M: np.ndarray
    resolution: tuple[int, int]


def head_scene(
    rings: int = HEAD_RINGS,
    sectors: int = HEAD_SECTORS,
    resolution: tuple[int, int] = CAPTURE_RESOLUTION,
) -> HeadScene:
    """An ellipsoid head (semi-axes 80 x 115 x 95 mm) as a UV-sphere grid of
    ``rings * sectors + 2`` vertices (7306 by default), framed as in a Multiface capture:
    the head spans about 60% of the image height; the UV seam is at the back."""
    height, width = resolution
    theta = np.linspace(0.0, math.pi, rings + 2)[1:-1]  # ring latitudes, poles excluded
    phi = np.arange(sectors) * (2.0 * math.pi / sectors)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring_xyz = np.stack(
        [80.0 * np.sin(t) * np.sin(p), 115.0 * np.cos(t), -95.0 * np.sin(t) * np.cos(p)], -1
    ).reshape(-1, 3)
    vertices = np.concatenate([[[0.0, 115.0, 0.0]], ring_xyz, [[0.0, -115.0, 0.0]]])
    top, bottom = 0, 1 + rings * sectors

    def vid(i, j):
        return 1 + i * sectors + j % sectors

    def tid(i, j):
        return i * (sectors + 1) + j

    i, j = (a.ravel() for a in np.meshgrid(np.arange(rings - 1), np.arange(sectors), indexing="ij"))
    jl = np.arange(sectors)
    last, grid = rings - 1, rings * (sectors + 1)
    vert_ids = np.concatenate(
        [
            np.stack([np.full(sectors, top), vid(0, jl + 1), vid(0, jl)], 1),
            np.stack([vid(i, j), vid(i, j + 1), vid(i + 1, j + 1)], 1),
            np.stack([vid(i, j), vid(i + 1, j + 1), vid(i + 1, j)], 1),
            np.stack([vid(last, jl), vid(last, jl + 1), np.full(sectors, bottom)], 1),
        ]
    )
    uv_ids = np.concatenate(
        [
            np.stack([grid + jl, tid(0, jl + 1), tid(0, jl)], 1),
            np.stack([tid(i, j), tid(i, j + 1), tid(i + 1, j + 1)], 1),
            np.stack([tid(i, j), tid(i + 1, j + 1), tid(i + 1, j)], 1),
            np.stack([tid(last, jl), tid(last, jl + 1), grid + sectors + jl], 1),
        ]
    )
    u, v = np.meshgrid(np.arange(sectors + 1) / sectors, 1.0 - theta / math.pi)
    pole_u = (jl + 0.5) / sectors
    uvs = np.concatenate(
        [
            np.stack([u.ravel(), v.ravel()], 1),
            np.stack([pole_u, np.ones(sectors)], 1),
            np.stack([pole_u, np.zeros(sectors)], 1),
        ]
    )
    focal = 0.6 * height * 1000.0 / 230.0
    K = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    Rt = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 1000.0]])
    return HeadScene(
        Topology(vert_ids, uv_ids, uvs),
        vertices.astype(np.float32),
        (K @ Rt).astype(np.float32),
        (int(height), int(width)),
    )


def render_rows(
    scene: HeadScene,
    backend: str,
    device: torch.device,
    batches: Sequence[int],
    tex_size: int,
    timing: Timing,
    deadline: Deadline,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Latency of `avatarq.render.Renderer` on the scene: rasterize alone, render (raster,
    UV interpolation, bilinear texture lookup, mask) and render with antialiasing
    (nvdiffrast only). Inputs live on ``device``; rows carry the covered pixel share."""
    from avatarq.render import RenderConfig, Renderer

    rows = Rows(emit)
    clock = "events" if device.type == "cuda" else "wall"
    modes = [("rasterize", False), ("render", False)]
    if backend == "nvdiffrast":
        modes.append(("render + antialias", True))
    renderers = {
        aa: Renderer(
            scene.topology, RenderConfig(resolution=scene.resolution, backend=backend, antialias=aa)
        )
        for aa in {aa for _, aa in modes}
    }
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        vertices = torch.from_numpy(scene.vertices).to(device).expand(batch, -1, -1).contiguous()
        M = torch.from_numpy(scene.M).to(device).expand(batch, -1, -1).contiguous()
        texture = torch.rand(batch, 3, tex_size, tex_size, generator=generator).to(device)
        for mode, aa in modes:
            labels = {"backend": backend, "mode": mode, "clock": clock}
            reason = deadline.spent(5.0)
            if reason:
                rows.append(skipped_row(reason, batch, **labels))
                continue
            renderer = renderers[aa]
            if mode == "rasterize":

                def run(renderer=renderer, vertices=vertices, M=M):
                    return renderer.rasterize(vertices, M)
            else:

                def run(renderer=renderer, vertices=vertices, texture=texture, M=M):
                    return renderer.render(vertices, texture, M)

            with torch.inference_mode():
                coverage = float((renderer.rasterize(vertices, M)[..., 3] > 0).float().mean())
                samples = measure(run, device, timing, clock)
            rows.append(latency_row(samples, batch, coverage=round(coverage, 4), **labels))
    return list(rows)
