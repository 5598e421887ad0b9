"""Latency measurement and statistics of `avatarq bench`.

Timing rules (metrics spec): warm up, then time many iterations; on a GPU either
synchronize before every clock read (`time_callable(..., sync=torch.cuda.synchronize)`)
or time with CUDA events (`CudaEventTimer`). Never time an asynchronous launch.
All times are milliseconds (float). torch is imported only by `CudaEventTimer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from avatarq.core.documents import json_float
from avatarq.errors import AvatarqError


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise AvatarqError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies of one stage (or end to end).

    Percentiles use linear interpolation between order statistics (numpy's default,
    "type 7"); `std_ms` is the population standard deviation (ddof = 0).

    Attributes:
        n: number of samples.
        batch: frames per iteration.
        p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms: milliseconds per iteration.
        frames_per_second: batch * 1000 / mean_ms (inf if mean_ms is 0).
        samples_ms: the samples, in measurement order (for histograms).
    """

    n: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    frames_per_second: float
    samples_ms: tuple[float, ...]

    @classmethod
    def from_samples(cls, ms: Sequence[float], batch: int = 1) -> LatencyStats:
        """Statistics of `ms` (at least one finite, non-negative sample, milliseconds)."""
        _check_count("batch", batch, 1)
        a = np.asarray(ms, dtype=np.float64).ravel()
        if a.size == 0:
            raise AvatarqError("latency statistics need at least one sample, got none")
        if not np.isfinite(a).all() or (a < 0).any():
            raise AvatarqError("latency samples must be finite and >= 0 milliseconds")
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        mean = float(a.mean())
        return cls(
            n=int(a.size),
            batch=int(batch),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            mean_ms=mean,
            std_ms=float(a.std()),
            min_ms=float(a.min()),
            max_ms=float(a.max()),
            frames_per_second=math.inf if mean == 0.0 else batch * 1000.0 / mean,
            samples_ms=tuple(float(x) for x in a),
        )

    def gate_values(self) -> dict[str, float]:
        """Latency metrics by gate name (see `avatarq.measure.gates.GATE_METRICS`)."""
        return {
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "fps": self.frames_per_second,
        }

    def to_dict(self, include_samples: bool = True) -> dict[str, Any]:
        """Plain JSON types; an infinite frames_per_second is written as "Infinity"."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "samples_ms":
                if include_samples:
                    out[f.name] = list(v)
            elif isinstance(v, int):
                out[f.name] = v
            else:
                out[f.name] = json_float(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        """Inverse of `to_dict(include_samples=True)`."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise AvatarqError(f"latency dict lacks field(s) {missing}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            v = d[f.name]
            if f.name == "samples_ms":
                kwargs[f.name] = tuple(float(x) for x in v)
            elif f.name in ("n", "batch"):
                kwargs[f.name] = int(v)
            else:
                kwargs[f.name] = float(v)
        return cls(**kwargs)


def time_callable(
    fn: Callable[[], Any],
    warmup: int,
    iters: int,
    sync: Callable[[], Any] | None = None,
) -> list[float]:
    """Wall-clock latency of `fn()` per call, in milliseconds (time.perf_counter_ns).

    Runs `fn` `warmup` times untimed, then `iters` timed calls. `sync` (e.g.
    `torch.cuda.synchronize`) is called right before each clock read, so a timed call
    starts with an idle device and ends only when its queued work is done: each
    iteration is sync, read clock, fn(), sync, read clock.

    Returns:
        `iters` floats, milliseconds, in call order.
    """
    if not callable(fn):
        raise AvatarqError(f"fn must be callable, got {type(fn).__name__}")
    if sync is not None and not callable(sync):
        raise AvatarqError(f"sync must be callable or None, got {type(sync).__name__}")
    _check_count("warmup", warmup, 0)
    _check_count("iters", iters, 1)
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        t1 = clock()
        out.append((t1 - t0) / 1e6)
    return out


class CudaEventTimer:
    """Times a callable's GPU work with pairs of CUDA events on the current stream.

    Each timed call is bracketed by `start.record()` / `end.record()`; all pairs are
    read after one final synchronize, so timing itself adds no host-device round trip
    between iterations. The time is what the GPU spent between the two events: kernel
    time plus any gap while the host was still launching (launch-bound work shows).

    Args:
        device: CUDA device (index, "cuda:N" or torch.device); default the current one.

    Raises:
        AvatarqError: torch has no usable CUDA device.
    """

    def __init__(self, device: int | str | Any | None = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise AvatarqError(
                "CudaEventTimer needs a CUDA device, and torch sees none; "
                "use time_callable on this machine"
            )
        self._torch = torch
        dev = torch.device("cuda" if device is None else device)  # an int means cuda:N
        if dev.type != "cuda":
            raise AvatarqError(f"CudaEventTimer device must be a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev

    @property
    def device_name(self) -> str:
        """GPU name, for the report (e.g. 'NVIDIA H100 80GB HBM3')."""
        return self._torch.cuda.get_device_name(self.device)

    def time(self, fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
        """GPU milliseconds of each of `iters` calls of `fn()` after `warmup` calls."""
        if not callable(fn):
            raise AvatarqError(f"fn must be callable, got {type(fn).__name__}")
        _check_count("warmup", warmup, 0)
        _check_count("iters", iters, 1)
        cuda = self._torch.cuda
        with cuda.device(self.device):
            for _ in range(warmup):
                fn()
            cuda.synchronize()
            starts = [cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [cuda.Event(enable_timing=True) for _ in range(iters)]
            for start, end in zip(starts, ends, strict=True):
                start.record()
                fn()
                end.record()
            cuda.synchronize()
            return [float(s.elapsed_time(e)) for s, e in zip(starts, ends, strict=True)]
