"""Run two runners on the same ordered inputs and compare what they decode.

The result is data, not a boolean (Polygraphy's comparator, torchao's SQNR checks): max and
mean errors in the texture's own units, PSNR, SSIM and the temporal metrics of
`avatarq.bench.metrics` (tDE, jitter ratio J, flicker excess FE), vertex errors, and both
runners' latencies. Its truth value is pass/fail against the tolerances it was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatarq.bench.latency import LatencyStats
from avatarq.bench.metrics import SequenceAccumulator, SequenceComparison, Tolerances
from avatarq.engines.base import Runner
from avatarq.errors import AvatarqError


def smooth_sequence(z_dim: int, n_frames: int, seed: int = 0, keyframe_every: int = 8):
    """A seeded ordered (z [T, Z], view [T, 3]) float32 sequence that moves smoothly.

    z interpolates linearly between N(0, 1) keyframes every ``keyframe_every`` steps; view
    turns slowly (+-0.3 rad) around +z. For comparisons when no latent file is given.
    """
    if n_frames < 2:
        raise AvatarqError(f"a sequence needs at least 2 frames, got {n_frames}")
    rng = np.random.default_rng(seed)
    n_keys = (n_frames - 1) // keyframe_every + 2
    keys = rng.standard_normal((n_keys, z_dim))
    t = np.arange(n_frames) / keyframe_every
    i = np.floor(t).astype(int)
    w = (t - i)[:, None]
    z = (1 - w) * keys[i] + w * keys[i + 1]
    angle = 0.3 * np.sin(np.linspace(0, 2 * np.pi, n_frames))
    view = np.stack([np.sin(angle), 0.1 * np.cos(3 * angle), np.cos(angle)], 1)
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    return z.astype(np.float32), view.astype(np.float32)


@dataclass(eq=False)
class RunnerComparison:
    """``candidate`` against ``reference`` on the same T ordered inputs.

    Attributes:
        reference, candidate: runner names.
        peak: texture units per 1.0 in `texture` (255 for 0..255 textures); the metrics of
            `texture` are computed on texture / peak.
        texture: PSNR (dB), SSIM, tDE, J, FE, errors of texture / peak, per frame and summary.
        texture_max_abs_error, texture_mean_abs_error: in the texture's own units.
        vertices_max_abs_error, vertices_mean_abs_error: in the vertices' own units.
        reference_latency, candidate_latency: wall-clock per `decode` call (ms).
        batch: frames per decode call.
    """

    reference: str
    candidate: str
    peak: float
    texture: SequenceComparison
    texture_max_abs_error: float
    texture_mean_abs_error: float
    vertices_max_abs_error: float
    vertices_mean_abs_error: float
    reference_latency: LatencyStats
    candidate_latency: LatencyStats
    batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.texture)

    @property
    def n_frames(self) -> int:
        return self.texture.n_frames

    def summary(self) -> str:
        t = self.texture
        ssim = "" if t.ssim_mean is None else f", SSIM {t.ssim_mean:.4f}"
        verdict = "PASS" if self else "FAIL: " + "; ".join(t.failures())
        return (
            f"{self.candidate} vs {self.reference} over {t.n_frames} frames: texture "
            f"max|err| {self.texture_max_abs_error:.4g}, mean|err| "
            f"{self.texture_mean_abs_error:.4g}, PSNR {_db(t.psnr_mean)} dB (min "
            f"{_db(t.psnr_min)}){ssim}, tDE {t.tde:.3g}, J {t.jitter_ratio:.3f}, FE "
            f"{t.flicker_excess:.3g}; vertices max|err| {self.vertices_max_abs_error:.4g}; "
            f"p50 {self.reference_latency.p50_ms:.2f} ms vs {self.candidate_latency.p50_ms:.2f} "
            f"ms. {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "n_frames": self.n_frames,
            "batch": self.batch,
            "peak": self.peak,
            "texture_max_abs_error": self.texture_max_abs_error,
            "texture_mean_abs_error": self.texture_mean_abs_error,
            "vertices_max_abs_error": self.vertices_max_abs_error,
            "vertices_mean_abs_error": self.vertices_mean_abs_error,
            "texture": self.texture.to_dict(),
            "reference_latency": self.reference_latency.to_dict(include_samples=False),
            "candidate_latency": self.candidate_latency.to_dict(include_samples=False),
            "passed": bool(self),
            **self.extra,
        }


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def compare_runners(
    reference: Runner,
    candidate: Runner,
    z: np.ndarray,
    view: np.ndarray,
    peak: float | None = None,
    tolerances: Tolerances | None = None,
    batch: int = 1,
    compute_ssim: bool = True,
) -> RunnerComparison:
    """Decode the ordered inputs with both runners and compare the outputs frame by frame.

    Args:
        reference, candidate: active runners (or inactive: they are activated and stay so).
        z: float32 [T, Z], view: float32 [T, 3], in temporal order (T >= 2).
        peak: texture units per 1.0 for the metrics (None: the reference's first-frame
            peak-to-peak range, for textures in normalized units; pass 255 for 0..255).
        tolerances: what the result's truth value checks (default: nothing).
        batch: frames per decode call (the last call may be smaller).
        compute_ssim: compute SSIM per frame (costly at 1024^2).

    Returns:
        `RunnerComparison`; frames stream through the metrics, so memory stays at a few
        frames whatever T is.
    """
    z = np.asarray(z)
    view = np.asarray(view)
    if z.ndim != 2 or view.shape != (z.shape[0], 3):
        raise AvatarqError(
            f"z must be [T, Z] and view [T, 3] with the same T, got {list(z.shape)} and {list(view.shape)}"
        )
    if z.shape[0] < 2:
        raise AvatarqError(f"comparisons need an ordered sequence of >= 2 frames, got {z.shape[0]}")
    if batch < 1 or batch > min(reference.max_batch, candidate.max_batch):
        raise AvatarqError(
            f"batch must be 1..{min(reference.max_batch, candidate.max_batch)}, got {batch}"
        )
    for runner in (reference, candidate):
        runner.activate()
    acc: SequenceAccumulator | None = None
    scale = peak
    tex_max = tex_sum = vert_max = vert_sum = 0.0
    tex_count = vert_count = 0
    ref_ms: list[float] = []
    cand_ms: list[float] = []
    for start in range(0, z.shape[0], batch):
        zb = np.ascontiguousarray(z[start : start + batch], dtype=np.float32)
        vb = np.ascontiguousarray(view[start : start + batch], dtype=np.float32)
        ref_tex, ref_vert = (a.copy() for a in reference.decode(zb, vb))
        ref_ms.append(reference.last_inference_ms)
        tex, vert = candidate.decode(zb, vb)
        cand_ms.append(candidate.last_inference_ms)
        if scale is None:
            span = float(ref_tex[0].max() - ref_tex[0].min())
            scale = span if span > 0 else 1.0
        if acc is None:
            acc = SequenceAccumulator(compute_ssim=compute_ssim)
        for f in range(ref_tex.shape[0]):
            acc.add(ref_tex[f] / scale, tex[f] / scale)
        diff = np.abs(tex.astype(np.float64) - ref_tex)
        tex_max, tex_sum, tex_count = (
            max(tex_max, float(diff.max())),
            tex_sum + float(diff.sum()),
            tex_count + diff.size,
        )
        vdiff = np.abs(vert.astype(np.float64) - ref_vert)
        vert_max, vert_sum, vert_count = (
            max(vert_max, float(vdiff.max())),
            vert_sum + float(vdiff.sum()),
            vert_count + vdiff.size,
        )
    return RunnerComparison(
        reference=reference.name,
        candidate=candidate.name,
        peak=float(scale),
        texture=acc.result(tolerances),
        texture_max_abs_error=tex_max,
        texture_mean_abs_error=tex_sum / tex_count,
        vertices_max_abs_error=vert_max,
        vertices_mean_abs_error=vert_sum / vert_count,
        reference_latency=LatencyStats.from_samples(ref_ms, batch),
        candidate_latency=LatencyStats.from_samples(cand_ms, batch),
        batch=batch,
    )


def compare_bundle(
    bundle,
    reference: str = "onnx",
    candidate: str = "auto",
    reference_options=None,
    candidate_options=None,
    latents=None,
    n_frames: int = 32,
    seed: int = 0,
    tolerances: Tolerances | None = None,
    batch: int = 1,
    compute_ssim: bool = True,
) -> RunnerComparison:
    """`compare_runners` on a bundle: what ``avatarq compare`` runs.

    Args:
        bundle: bundle directory (or an opened `Bundle`).
        reference, candidate: backend names (`avatarq.engines.registry`); ``auto`` is the
            best engine built for this machine (`resolve_backend`).
        reference_options, candidate_options: `RunOptions` of each runner.
        latents: a latent-sequence .npz (or `LatentSequence`); None: `smooth_sequence`
            with ``n_frames`` frames and ``seed``.
        tolerances, batch, compute_ssim: as in `compare_runners`.

    The texture peak is 255 when the bundle's de-normalization is folded in, else the
    reference's first-frame range.
    """
    from avatarq.engines.base import RunOptions
    from avatarq.engines.registry import open_runner, resolve_backend
    from avatarq.export.bundle import Bundle, open_bundle

    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    if latents is None:
        z, view = smooth_sequence(opened.manifest.z_dim, n_frames, seed)
    else:
        from avatarq.data.latents import LatentSequence

        seq = latents if isinstance(latents, LatentSequence) else LatentSequence.load(latents)
        if seq.z_dim != opened.manifest.z_dim:
            raise AvatarqError(
                f"latent sequence has z of size {seq.z_dim}, the bundle's decoder takes {opened.manifest.z_dim}"
            )
        z, view = seq.z, seq.view
    names = [resolve_backend(opened, name) for name in (reference, candidate)]
    runners = [
        open_runner(opened, name, options or RunOptions())
        for name, options in zip(names, (reference_options, candidate_options), strict=True)
    ]
    peak = 255.0 if opened.manifest.normalization.get("folded") else None
    with runners[0] as ref, runners[1] as cand:
        result = compare_runners(ref, cand, z, view, peak, tolerances, batch, compute_ssim)
    result.extra["bundle"] = str(opened.root)
    result.extra["backends"] = {"reference": names[0], "candidate": names[1]}
    return result
