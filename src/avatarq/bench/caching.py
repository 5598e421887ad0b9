"""Bench a bundle's Neural-Caching mode: warp path against the full decoder.

For one ordered sequence (`avatarq.bench.sequences`):

- latency (ONNX Runtime, batch 1, ms per call) of the full decoder (the cache graph: the
  decoder plus one extra output) and of the warp graph, timed round-robin in one run so
  that their ratio is fair on a busy machine; the mean per-frame latency of the refresh
  mode follows as ((N - 1) warp + full) / N;
- quality and temporal stability against the FP32 decoder (the bundle's reference graph,
  run by ONNX Runtime) of three streams: ``full`` (the cache graph's own texture every
  frame: the bundle's precision without caching), ``refresh`` (`CachingRuntime` with a
  cache every N frames), ``hold`` (the baseline a warp network must beat: the same refresh
  schedule with each cached frame shown unchanged until the next refresh) and
  ``alternate`` (every frame warped from the previous frame's cache, the two-runner
  pipeline) with its baseline ``previous`` (each frame shows the previous frame's full
  decode unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.bench.sequences import BenchSequence
from avatarq.core.documents import json_float
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError
from avatarq.export.bundle import open_bundle
from avatarq.measure.latency import LatencyStats
from avatarq.measure.sequence import SequenceComparison, compare_sequences

STREAMS = ("full", "refresh", "hold", "alternate", "previous")


@dataclass(frozen=True)
class CachingBenchResult:
    """Latency of both graphs and the fidelity of each stream against FP32.

    Attributes:
        sequence: where the frames came from; n_frames: T.
        refresh_every: N of the refresh stream.
        peak: the texture peak the PSNRs use (255 for 0..255 textures).
        latency: "full" and "warp" statistics (ms per call, batch 1).
        quality: stream name -> comparison with the FP32 decoder (texture); its PSNR is
            read as ``psnr_all`` (all frames together: refresh frames are exact, so the mean
            of per-frame PSNRs would be infinite) and ``psnr_min`` (the worst frame).
        precision: "cache" and "warp" graph precisions.
        motion_psnr_db: PSNR between consecutive frames of the FP32 decoder itself (all
            pairs together): how much the content moves; holding a frame costs about this.
    """

    sequence: str
    n_frames: int
    refresh_every: int
    peak: float
    latency: dict[str, LatencyStats]
    quality: dict[str, SequenceComparison]
    precision: dict[str, str]
    motion_psnr_db: float = float("nan")

    @property
    def refresh_mean_ms(self) -> float:
        n = self.refresh_every
        return ((n - 1) * self.latency["warp"].mean_ms + self.latency["full"].mean_ms) / n

    @property
    def speedup(self) -> float:
        """Mean full-decoder latency over mean warp latency."""
        return self.latency["full"].mean_ms / self.latency["warp"].mean_ms

    def to_dict(self) -> dict[str, Any]:
        def lat(s: LatencyStats) -> dict[str, float]:
            return {
                "p50_ms": s.p50_ms,
                "p90_ms": s.p90_ms,
                "mean_ms": s.mean_ms,
                "min_ms": s.min_ms,
                "max_ms": s.max_ms,
                "n": s.n,
            }

        def qual(q: SequenceComparison) -> dict[str, float | str]:
            return {
                "psnr_all_db": json_float(q.psnr_all),
                "psnr_min_db": json_float(q.psnr_min),
                "tde": json_float(q.tde),
                "jitter_ratio": json_float(q.jitter_ratio),
                "flicker_excess": json_float(q.flicker_excess),
            }

        return {
            "sequence": self.sequence,
            "n_frames": self.n_frames,
            "refresh_every": self.refresh_every,
            "peak": self.peak,
            "precision": dict(self.precision),
            "motion_psnr_db": json_float(self.motion_psnr_db),
            "latency": {k: lat(v) for k, v in self.latency.items()},
            "refresh_mean_ms": self.refresh_mean_ms,
            "speedup": self.speedup,
            "quality": {k: qual(v) for k, v in self.quality.items()},
        }

    def lines(self) -> list[str]:
        """Human-readable summary, one line per path/stream."""
        full, warp = self.latency["full"], self.latency["warp"]
        out = [
            f"sequence   {self.sequence}; consecutive FP32 frames differ by "
            f"{self.motion_psnr_db:.1f} dB PSNR",
            f"latency    full decoder p50 {full.p50_ms:.3g} ms | warp p50 {warp.p50_ms:.3g} ms "
            f"| {self.speedup:.2f}x | refresh every {self.refresh_every}: "
            f"{self.refresh_mean_ms:.3g} ms/frame",
        ]
        for name, q in self.quality.items():
            out.append(
                f"{name:<10} texture PSNR {q.psnr_all:.2f} dB (worst frame {q.psnr_min:.2f}) tDE "
                f"{q.tde:.3g} J {q.jitter_ratio:.3f} vs FP32"
            )
        return out


def _fp32_textures(bundle, sequence: BenchSequence, threads: int) -> np.ndarray:
    from avatarq.core.ort import make_session

    path = bundle.reference_path()
    if path is None:
        raise AvatarqError(
            f"bundle {bundle.root} has no FP32 reference graph to judge the caching mode "
            "against (export without --no-reference)"
        )
    session = make_session(path, threads=threads)
    frames = []
    for t in range(len(sequence)):
        texture, _ = session.run(
            None, {"z": sequence.z[t : t + 1], "view": sequence.view[t : t + 1]}
        )
        frames.append(texture[0])
    return np.stack(frames)


def _stream(runtime, sequence: BenchSequence) -> np.ndarray:
    frames = []
    for t in range(len(sequence)):
        texture, _ = runtime.decode(sequence.z[t : t + 1], sequence.view[t : t + 1])
        frames.append(texture[0].copy())
    return np.stack(frames)


def bench_caching(
    bundle_path: str | Path,
    sequence: BenchSequence,
    refresh_every: int | None = None,
    warmup: int = 3,
    iters: int = 20,
    threads: int = 0,
    progress: Progress | None = None,
) -> CachingBenchResult:
    """Latency of the full and warp graphs and quality of the caching streams vs FP32."""
    from avatarq.runtime.caching import CachingRuntime

    say = or_silent(progress)
    for name, value, low in (("warmup", warmup, 0), ("iters", iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AvatarqError(f"{name} must be an integer >= {low}, got {value!r}")
    bundle = open_bundle(bundle_path)
    if bundle.manifest.caching is None:
        raise AvatarqError(
            f"bundle {bundle.root} has no Neural-Caching graphs; add them with avatarq "
            "distill-warp --bundle"
        )
    sequence.check_z_dim(bundle.manifest.z_dim)
    say("FP32 reference", 0, 1)
    reference = _fp32_textures(bundle, sequence, threads)
    peak = 255.0 if bundle.manifest.normalization.folded else float(np.ptp(reference)) or 1.0
    textures: dict[str, np.ndarray] = {}
    with CachingRuntime.open(bundle.root, "refresh", 1, threads=threads) as full:
        textures["full"] = _stream(full, sequence)
    with CachingRuntime.open(bundle.root, "refresh", refresh_every, threads=threads) as rt:
        n = rt.refresh_every
        textures["refresh"] = _stream(rt, sequence)
        say("timing the full decoder and the warp graph", 0, iters)
        z, view = sequence.z[:1], sequence.view[:1]
        cache = rt.run_cache(z, view)
        z1, view1 = sequence.z[1:2], sequence.view[1:2]
        samples: dict[str, list[float]] = {"full": [], "warp": []}
        calls = {
            "full": lambda: rt.run_cache(z1, view1),
            "warp": lambda: rt.run_warp(cache, z1, view1),
        }
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        for i in range(iters):  # round-robin: both see the same machine load
            for name, fn in calls.items():
                t0 = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
            say("timing the full decoder and the warp graph", i + 1, iters)
    textures["hold"] = textures["full"][[t - t % n for t in range(len(sequence))]]
    textures["previous"] = textures["full"][[max(0, t - 1) for t in range(len(sequence))]]
    with CachingRuntime.open(bundle.root, "alternate", threads=threads) as alt:
        textures["alternate"] = _stream(alt, sequence)
    quality = {
        name: compare_sequences(reference / peak, textures[name] / peak, compute_ssim=False)
        for name in STREAMS
    }
    record = bundle.manifest.caching
    return CachingBenchResult(
        sequence=sequence.source,
        n_frames=len(sequence),
        refresh_every=n,
        peak=peak,
        latency={k: LatencyStats.from_samples(v) for k, v in samples.items()},
        quality=quality,
        precision={"cache": record.cache.precision, "warp": record.warp.precision},
        motion_psnr_db=_psnr(reference[:-1], reference[1:], peak),
    )


def _psnr(ref: np.ndarray, test: np.ndarray, peak: float) -> float:
    """PSNR (dB) of ``test`` against ``ref`` with ``peak`` as the peak value."""
    from avatarq.measure.images import psnr_from_mse

    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return psnr_from_mse(mse / peak**2)
