"""Low bit widths side by side: formats x methods x calibration-sample seeds, vs FP32.

For every seed, calibration samples are drawn with that seed (random (frame, camera) pairs
and clips of the capture) and their visibility masks rasterized once; then each (format,
method) calibrates the decoder, becomes a Q/DQ graph, and ONNX Runtime (CPU) decodes one
ordered clip with it. Textures are compared with the FP32 graph's on the texels the clip's
camera sees (metrics.md: PSNR, tDE, jitter ratio J) and over all texels; the graph's size
and the calibration's wall time are recorded. `LowbitStudy.summary` gives mean and spread
(min..max) over the seeds per (format, method); `LowbitStudy.markdown` is the table of
docs/benchmarks.md ("Low bit widths"). `benchmarks/lowbit.py` runs it from the command line.
A POCA row's seconds include the visibility masks of its sample set, rasterized once and
cached in the workdir (keyed by the samples' hash) with the time that took.

Held-out frames (``holdout``): "frames" (default) calibrates on the odd frames of every
segment and evaluates on the even frames of the first segment (15 fps), so no evaluation
latent is a calibration latent while the calibration still spans the capture's expressions;
"segment" calibrates only on the other segments (on the synthetic capture their latents
have 1/5 the spread of the evaluation segment's: a test of range extrapolation, where
every activation range clips); "none" evaluates on frames calibration may have drawn.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError
from avatarq.workflows.peers import StudyRecord

HOLDOUTS = ("frames", "segment", "none")
METRICS = ("psnr_seen", "tde_seen", "j_seen", "psnr_all", "tde_all", "jod", "bytes", "seconds")


@dataclass(frozen=True)
class LowbitMethod:
    """A calibration method: a row label and `CalibrationConfig` fields (bits and seed are
    set per run)."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    def config(self, bits: str, seed: int):  # -> CalibrationConfig
        from avatarq.calibration.config import CalibrationConfig

        return CalibrationConfig(bits=bits, seed=seed, **self.settings)

    def applies_to(self, bits: str) -> bool:
        """Integer-rounding methods (GPTQ, AdaRound, blocks) do not apply to fp8; smaller
        texel-bias storage is measured where the weights are 4-bit (the biases are then
        most of the graph)."""
        if self.settings.get("bias_format", "fp32") != "fp32" and not bits.startswith("w4"):
            return False
        if bits != "fp8" or self.name == "default":
            return True
        return not any(self.settings.get(k) for k in ("gptq", "adaround", "weight_block"))


def default_methods(iters: int = 100) -> list[LowbitMethod]:
    """The methods docs/benchmarks.md compares (every method off unless named)."""
    off = {"gptq": False, "smooth": False, "hadamard": False, "weight_search": "max"}
    poca = {**off, "iters": iters}
    return [
        LowbitMethod("max", {**off, "method": "max"}),
        # GPTQ as published: unweighted Hessian, no masks, no reconstruction
        LowbitMethod("gptq", {**off, "gptq": True, "visibility": False, "iters": 0}),
        # avatarq's default for the width (`METHOD_DEFAULTS`)
        LowbitMethod("default", {"iters": iters}),
        LowbitMethod("poca", poca),
        LowbitMethod("poca+mse", {**poca, "weight_search": "mse"}),
        LowbitMethod("poca+gptq", {**poca, "gptq": True}),
        LowbitMethod("poca+smooth", {**poca, "smooth": True}),
        LowbitMethod("poca+hadamard", {**poca, "hadamard": True}),
        LowbitMethod("poca+adaround", {**poca, "adaround": True}),
        LowbitMethod("poca+gptq+mse", {**poca, "gptq": True, "weight_search": "mse"}),
        LowbitMethod("poca+gptq+smooth", {**poca, "gptq": True, "smooth": True}),
        LowbitMethod("poca+gptq+hadamard", {**poca, "gptq": True, "hadamard": True}),
        LowbitMethod("poca+temporal", {**poca, "temporal_weight": 1.0}),
        LowbitMethod("poca+gptq+temporal", {**poca, "gptq": True, "temporal_weight": 1.0}),
        LowbitMethod("poca+gptq+int4-biases", {**poca, "gptq": True, "bias_format": "int4"}),
    ]


@dataclass
class LowbitRow:
    """One (format, method, seed): metrics vs FP32 on the clip ([0, 1] texture units)."""

    bits: str
    method: str
    seed: int
    psnr_seen: float
    tde_seen: float
    j_seen: float
    psnr_all: float
    tde_all: float
    bytes: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    jod: float = math.nan


@dataclass
class LowbitStudy(StudyRecord):
    """Every `LowbitRow` plus what they were measured on."""

    rows: list[LowbitRow]

    @classmethod
    def from_json(cls, text: str) -> LowbitStudy:
        data = json.loads(text)
        return cls([LowbitRow(**r) for r in data["rows"]], data.get("setup", {}))

    def summary(self) -> list[dict[str, Any]]:
        """Per (bits, method), in first-seen order: n, and for each metric mean, min, max."""
        groups: dict[tuple[str, str], list[LowbitRow]] = {}
        for r in self.rows:
            groups.setdefault((r.bits, r.method), []).append(r)
        out = []
        for (bits, method), rows in groups.items():
            entry: dict[str, Any] = {"bits": bits, "method": method, "n": len(rows)}
            for m in METRICS:
                values = [float(getattr(r, m)) for r in rows]
                entry[m] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                    "std": float(np.std(values)),
                }
            out.append(entry)
        return out

    def markdown(self, fp32_bytes: int | None = None) -> str:
        """One row per (format, method): mean [min..max] over seeds."""
        header = (
            "| bits | method | PSNR seen (dB) | tDE seen (1e-4) | J seen | PSNR all (dB) "
            "| texture JOD | model.onnx | calibration |"
        )
        lines = [header, "|---|---|---|---|---|---|---|---|---|"]
        for e in self.summary():
            size_bytes = e["bytes"]["mean"]
            ratio = f" ({fp32_bytes / size_bytes:.1f}x)" if fp32_bytes and size_bytes else ""
            size = f"{size_bytes / 1e6:.2f} MB{ratio}" if size_bytes else "-"
            lines.append(
                f"| {e['bits']} | {e['method']} | {_spread(e['psnr_seen'], 1)} "
                f"| {_spread(e['tde_seen'], 2, 1e4)} | {_spread(e['j_seen'], 3)} "
                f"| {_spread(e['psnr_all'], 1)} | {_spread(e['jod'], 3)} | {size} "
                f"| {e['seconds']['mean']:.0f} s |"
            )
        return "\n".join(lines)


def _spread(stat: dict[str, float], digits: int, factor: float = 1.0) -> str:
    mean, lo, hi = (stat[k] * factor for k in ("mean", "min", "max"))
    if math.isnan(mean):
        return "-"
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"


def _texture_jod(reference: np.ndarray, test: np.ndarray) -> float:
    """FovVideoVDP JOD of the texture clip ``test`` against ``reference`` (float32
    [T, 3, S, S] in [0, 1]), played as a video at the metric's default display and fps."""
    from avatarq.measure.perceptual import score

    def frames(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.clip(x, 0.0, 1.0).transpose(0, 2, 3, 1))

    return score(frames(reference), frames(test)).jod


def lowbit_study(
    checkpoint: str | Path,
    capture_root: str | Path,
    workdir: str | Path,
    bit_widths: Sequence[str] = ("w8a8", "w6a6", "w4a8", "w4a4", "fp8"),
    methods: Sequence[LowbitMethod] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_random: int = 64,
    max_frames: int = 32,
    threads: int = 0,
    progress: Progress | None = None,
    done: LowbitStudy | None = None,
    on_row: Callable[[LowbitRow], None] | None = None,
    holdout: str = "frames",
    clip: Any = None,
    peers: Sequence[Any] = (),
) -> LowbitStudy:
    """Measure every (format, method, seed) on ``checkpoint``'s decoder.

    Args:
        checkpoint, capture_root: the DAM and the capture it was trained on.
        workdir: where the FP32 graph and the last quantized graph are written.
        bit_widths: formats (``--bits`` values); methods: `default_methods` by default.
        seeds: calibration-sample seeds (also the calibration's own seed).
        n_random: random (frame, camera) calibration samples per seed (plus 2 clips of 8).
        max_frames: frames of the evaluation clip (first segment, frontal camera).
        threads: ONNX Runtime threads (0: its default).
        done: rows measured before (skipped here, kept in the result): resumes a study.
        on_row: called with each new row (to save progress).
        holdout: "frames", "segment" or "none" (module docstring); ignored with ``clip``.
        clip: the evaluation clip (a `BenchSequence` of other frames, e.g. the test
            subject's held-out clip; calibration then draws from every capture frame);
            None: a clip of the capture chosen by ``holdout``.
        peers: `avatarq.workflows.lowbit_peers.PeerRecipe` rows measured next to the
            methods (ONNX Runtime quantize_static, ModelOpt), where they apply.
    """
    import copy
    import dataclasses

    import onnx
    import torch

    from avatarq.bench.sequences import BenchSequence, sequence_from_capture
    from avatarq.calibration.masks import visibility_masks
    from avatarq.calibration.pipeline import calibrate
    from avatarq.calibration.samples import CalibrationSamples, samples_from_capture
    from avatarq.core.ort import make_session
    from avatarq.export.onnx_export import save_onnx
    from avatarq.export.qdq import quantize_onnx
    from avatarq.measure import compare_sequences
    from avatarq.measure import perceptual as perceptual_metric
    from avatarq.workflows.lowbit_peers import PeerRecipe, peer_textures
    from avatarq.workflows.peers import StudySubject, decode_clip, model_record

    say = or_silent(progress)
    perceptual = perceptual_metric.available(perceptual_metric.DEFAULT_METRIC)
    methods = list(methods) if methods is not None else default_methods()
    names = [m.name for m in [*methods, *peers]]
    subject = StudySubject.load(checkpoint, capture_root, workdir, names)
    model, capture, decoder = subject.model, subject.capture, subject.decoder
    fp32_model, fp32_path, workdir = subject.fp32_model, subject.fp32_path, subject.workdir

    if holdout not in HOLDOUTS:
        raise AvatarqError(f"holdout must be one of {', '.join(HOLDOUTS)}, got {holdout!r}")
    segment = next(capture.clips())[0]
    calibration_capture = capture
    step = 1
    if holdout != "none" and clip is None:
        calibration_capture = copy.copy(capture)
        if holdout == "segment":
            keep = {f for f in capture.frames if f[0] != segment}
        else:
            step = 2
            keep = {(seg, f) for seg, ids in capture.clips() for f in ids[1::2]}
        calibration_capture.frames = [f for f in capture.frames if f in keep]
        if not calibration_capture.frames:
            raise AvatarqError(f"holdout {holdout!r} leaves no frame to calibrate on")
    if clip is None:
        clip = sequence_from_capture(capture, segment, checkpoint, max_frames=max_frames * step)
    if step == 2:
        even = clip.inputs.subset(range(0, len(clip.inputs), 2))
        even = dataclasses.replace(even, source=even.source + ", even frames")
        clip = BenchSequence(even, clip.capture_root)
    clip_samples = CalibrationSamples(clip.inputs, capture.topology)
    with torch.no_grad():
        seen = visibility_masks(decoder, clip_samples).numpy()[:, None]
    z = np.ascontiguousarray(clip.z, dtype=np.float32)
    view = np.ascontiguousarray(clip.view, dtype=np.float32)
    reference = decode_clip(make_session(fp32_path, "cpu", threads), z, view)

    rows = list(done.rows) if done is not None else []
    finished = {(r.bits, r.method, r.seed) for r in rows}
    for seed in seeds:
        todo = [
            (bits, m)
            for bits in bit_widths
            for m in [*methods, *peers]
            if m.applies_to(bits) and (bits, m.name, seed) not in finished
        ]
        if not todo:
            continue
        say(f"seed {seed}: samples and visibility masks")
        samples = samples_from_capture(model, calibration_capture, n_random, seed=seed)
        cache = workdir / f"visibility_{samples.hash[:16]}.npz"
        start = time.perf_counter()
        if cache.is_file():  # rasterized by an earlier run on these very samples
            with np.load(cache) as data:
                visibility = torch.from_numpy(data["visibility"])
                mask_seconds = float(data["seconds"])
        else:
            with torch.no_grad():
                visibility = visibility_masks(decoder, samples)
            mask_seconds = time.perf_counter() - start
            np.savez_compressed(cache, visibility=visibility.numpy(), seconds=mask_seconds)
        for bits, method in todo:
            start = time.perf_counter()
            if isinstance(method, PeerRecipe):
                config = None
                calibration = (samples.inputs.z, samples.inputs.view)
                path = workdir / "peer.onnx"
                test, size = peer_textures(
                    method, bits, decoder, fp32_path, path, calibration, (z, view), threads
                )
                seconds = time.perf_counter() - start
            else:
                config = method.config(bits, seed)
                artifact = calibrate(decoder, samples, config, visibility=visibility)
                seconds = time.perf_counter() - start
                if config.method == "poca":
                    seconds += mask_seconds
                graph = quantize_onnx(fp32_model, artifact)
                path = workdir / "quantized.onnx"
                save_onnx(graph, path)
                test = decode_clip(make_session(path, "cpu", threads), z, view)
                size = path.stat().st_size
            everywhere = compare_sequences(reference, test, compute_ssim=False)
            visible = compare_sequences(reference, test, mask=seen, compute_ssim=False)
            jod = _texture_jod(reference, test) if perceptual else math.nan
            row = LowbitRow(
                bits=bits,
                method=method.name,
                seed=seed,
                psnr_seen=visible.psnr_mean,
                tde_seen=visible.tde,
                j_seen=visible.jitter_ratio,
                psnr_all=everywhere.psnr_mean,
                tde_all=everywhere.tde,
                bytes=size,
                seconds=seconds,
                settings=config.to_dict() if config is not None else {"peer": method.kind},
                jod=jod,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            say(
                f"  {bits} {method.name} seed {seed}: PSNR seen {row.psnr_seen:.2f} dB, tDE seen "
                f"{row.tde_seen:.3g}, J seen {row.j_seen:.3f}, {row.bytes / 1e6:.2f} MB, "
                f"{seconds:.0f} s"
            )
    setup = {
        "model": model_record(decoder),
        "samples": {
            "random": n_random,
            "seeds": list(seeds),
            "holdout": holdout,
            "frames": len(calibration_capture.frames),
        },
        "clip": {"source": clip.source, "frames": len(clip.ids)},
        "fp32_bytes": fp32_path.stat().st_size,
        "ort_threads": threads,
        "onnx_opset": [
            o.version for o in onnx.load(str(fp32_path), load_external_data=False).opset_import
        ],
    }
    return LowbitStudy(rows, setup)
