"""Latency and per-node profiles of ONNX graphs under ONNX Runtime (CPU).

`alternating_latency` times several graphs in ONE run, interleaving their iterations, so
that load from other processes hits them alike and the ratio of their medians is fair on a
shared machine. `profile_nodes` reads ONNX Runtime's own profiler: the kernel time of each
node of the optimized graph (after fusions, e.g. the QLinearConv that a DQ -> Conv -> Q
becomes), median and minimum over the iterations.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avatarq.core.ort import make_session, session_options
from avatarq.errors import AvatarqError
from avatarq.measure.latency import LatencyStats


@dataclass(frozen=True)
class NodeTime:
    """Kernel time of one node of the optimized graph (milliseconds per inference).

    Attributes:
        node: node name after ONNX Runtime's optimizations.
        op: its operator (e.g. QLinearConv, Conv, ConvTranspose, Col2Im).
        calls: inferences profiled.
        median_ms, min_ms: over those inferences.
    """

    node: str
    op: str
    calls: int
    median_ms: float
    min_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check(feeds: Mapping[str, np.ndarray], iters: int) -> None:
    if not feeds:
        raise AvatarqError("feeds must name at least one input")
    if iters < 1:
        raise AvatarqError(f"iters must be >= 1, got {iters}")


def alternating_latency(
    models: Mapping[str, str | Path],
    feeds: Mapping[str, np.ndarray],
    threads: int = 2,
    iters: int = 50,
    warmup: int = 3,
    spin_wait: bool = False,
) -> dict[str, LatencyStats]:
    """Wall-clock latency of each graph's ``session.run``, iterations interleaved.

    Args:
        models: {label: ONNX file}.
        feeds: the inputs of one inference ({name: array}), the same for every graph.
        threads: ONNX Runtime intra-op threads.
        iters, warmup: timed and untimed inferences per graph.
        spin_wait: let idle ORT threads spin (see `avatarq.core.ort.session_options`).

    Returns:
        {label: LatencyStats} (milliseconds, batch = the feeds' leading dimension).
    """
    _check(feeds, iters)
    sessions = {k: make_session(p, "cpu", threads, spin_wait=spin_wait) for k, p in models.items()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, dict(feeds))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(iters):
        for label, session in sessions.items():
            start = time.perf_counter_ns()
            session.run(None, dict(feeds))
            samples[label].append((time.perf_counter_ns() - start) / 1e6)
    batch = int(next(iter(feeds.values())).shape[0])
    return {k: LatencyStats.from_samples(v, batch) for k, v in samples.items()}


def profile_nodes(
    model: str | Path,
    feeds: Mapping[str, np.ndarray],
    threads: int = 2,
    iters: int = 20,
    warmup: int = 3,
    spin_wait: bool = False,
) -> list[NodeTime]:
    """Per-node kernel times of ``model`` from ONNX Runtime's profiler, slowest first."""
    _check(feeds, iters)
    with tempfile.TemporaryDirectory() as tmp:
        warm = make_session(model, "cpu", threads, spin_wait=spin_wait)
        for _ in range(warmup):
            warm.run(None, dict(feeds))
        del warm
        options = session_options(threads, f"{tmp}/ort", spin_wait)
        session = make_session(model, "cpu", threads, options)
        for _ in range(iters):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "")
            times[(name[: -len("_kernel_time")], op)].append(event["dur"] / 1000.0)
    rows = [
        NodeTime(node, op, len(v), float(np.median(v)), float(np.min(v)))
        for (node, op), v in times.items()
    ]
    return sorted(rows, key=lambda r: -r.median_ms)


def time_by_op(rows: list[NodeTime], field: str = "median_ms") -> dict[str, float]:
    """Sum of ``field`` over nodes, per operator, largest first."""
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[row.op] += getattr(row, field)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
