"""Latency of the runners: warm-up, then timed decode -> copy -> render iterations
(one after another, or interleaved round-robin)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DecodeCall:
    """How the harness runs a runner on a batch of the sequence's inputs.

    A DAM bundle (``declared`` False): ``runner.decode(z, view)`` -> (texture, vertices).
    A declared decoder's bundle: ``runner.infer(feeds)`` with the graph's inputs, the
    texture is output ``texture`` and the vertices output ``mesh`` (None: no mesh, nothing
    rendered).
    """

    declared: bool = False
    inputs: tuple[str, ...] = ("z", "view")
    texture: str = "texture"
    mesh: str | None = "vertices"

    @classmethod
    def for_manifest(cls, manifest: Any) -> DecodeCall:
        if manifest.declaration is None:
            return cls()
        outputs = [spec.name for spec in manifest.outputs]
        return cls(
            True,
            tuple(spec.name for spec in manifest.inputs),
            outputs[0],
            outputs[1] if manifest.n_vertices > 0 else None,
        )

    def __call__(
        self, runner: BenchRunner, feeds: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.declared:
            return runner.decode(feeds["z"], feeds["view"])
        out = runner.infer({name: feeds[name] for name in self.inputs})  # type: ignore[attr-defined]
        return out[self.texture], None if self.mesh is None else out[self.mesh]


def timing_batches(
    sequence: BenchSequence, setup: RenderSetup | None, config: BenchConfig
) -> list[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """(inputs by name, M) of each warm-up and timed iteration: batches taken cyclically."""
    t_len, b = len(sequence), config.batch
    out = []
    for i in range(config.warmup + config.iters):
        idx = [(i * b + k) % t_len for k in range(b)]
        M = None if setup is None else np.ascontiguousarray(setup.M[idx])
        out.append((sequence.feeds(idx), M))
    return out


def time_step(
    runner: BenchRunner,
    batch: tuple[dict[str, np.ndarray], np.ndarray | None],
    setup: RenderSetup | None,
    denorm: Denorm,
    call: DecodeCall = DecodeCall(),
) -> dict[str, float]:
    """Milliseconds of each stage of one decode -> copy -> render iteration."""
    import torch

    feeds, M = batch
    cuda = setup is not None and setup.device.type == "cuda"
    clock = time.perf_counter_ns
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    tex, vert = call(runner, feeds)  # host outputs: the call has finished
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
    call: DecodeCall = DecodeCall(),
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
            time_step(runners[name], batch, setup, denorm, call)
    if config.interleave:
        order = [
            (i, names[(i + k) % len(names)]) for i in range(len(timed)) for k in range(len(names))
        ]
    else:
        order = [(i, n) for n in names for i in range(len(timed))]
    for done, (i, name) in enumerate(order, 1):
        for stage, ms in time_step(runners[name], timed[i], setup, denorm, call).items():
            samples[name][stage].append(ms)
        if progress is not None:
            progress("timing", done, len(order))
    return {
        n: {s: LatencyStats.from_samples(ms, batch=config.batch) for s, ms in st.items() if ms}
        for n, st in samples.items()
    }
