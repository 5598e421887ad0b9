"""Latency of the runners: warm-up, then timed decode -> copy -> render iterations
(one after another, or interleaved round-robin)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from avatarq.bench.frames import Denorm, RenderSetup
from avatarq.bench.results import STAGES, BenchConfig
from avatarq.bench.sequences import BenchSequence
from avatarq.core.progress import Progress
from avatarq.measure.latency import LatencyStats

# --------------------------------------------------------------------------- timing


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


def timing_batches(
    sequence: BenchSequence, setup: RenderSetup | None, config: BenchConfig
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(z, view, M) of each warm-up and timed iteration: batches taken cyclically."""
    t_len, b = len(sequence), config.batch
    out = []
    for i in range(config.warmup + config.iters):
        idx = [(i * b + k) % t_len for k in range(b)]
        M = None if setup is None else np.ascontiguousarray(setup.M[idx])
        out.append((sequence.z[idx], sequence.view[idx], M))
    return out


def time_step(
    runner: BenchRunner,
    batch: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    setup: RenderSetup | None,
    denorm: Denorm,
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


def time_runners(
    runners: Mapping[str, BenchRunner],
    sequence: BenchSequence,
    setup: RenderSetup | None,
    denorm: Denorm,
    config: BenchConfig,
    progress: Progress | None,
) -> dict[str, dict[str, LatencyStats]]:
    """Per-stage latency of every runner: `config.warmup` untimed iterations each, then
    `config.iters` timed ones, runner after runner, or round-robin with
    `config.interleave` (so that load from other processes hits all runners alike)."""
    batches = timing_batches(sequence, setup, config)
    warm, timed = batches[: config.warmup], batches[config.warmup :]
    names = list(runners)
    samples = {n: {s: [] for s in STAGES} for n in names}
    for name in names:
        for batch in warm:
            time_step(runners[name], batch, setup, denorm)
    if config.interleave:
        order = [
            (i, names[(i + k) % len(names)]) for i in range(len(timed)) for k in range(len(names))
        ]
    else:
        order = [(i, n) for n in names for i in range(len(timed))]
    for done, (i, name) in enumerate(order, 1):
        for stage, ms in time_step(runners[name], timed[i], setup, denorm).items():
            samples[name][stage].append(ms)
        if progress is not None:
            progress("timing", done, len(order))
    return {
        n: {s: LatencyStats.from_samples(ms, batch=config.batch) for s, ms in st.items() if ms}
        for n, st in samples.items()
    }
