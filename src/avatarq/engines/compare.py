"""``avatarq compare``: two backends of one bundle on the same ordered inputs.

The comparison itself is `avatarq.measure.compare`; this module opens the runners and
chooses the inputs (a latent file, or the bundle's smooth default clip).
"""

from __future__ import annotations

from pathlib import Path

from avatarq.core.inputs import DecoderInputs
from avatarq.errors import AvatarqError
from avatarq.measure import Comparison, Tolerances, compare


def bundle_peak(bundle) -> float | None:  # noqa: ANN001 - a Bundle
    """255 for a bundle with de-normalization folded in (0..255 texels), else None (the
    comparator's first-frame range)."""
    return 255.0 if bundle.manifest.normalization.folded else None


def compare_bundle(
    bundle,
    reference: str = "onnx",
    candidate: str = "auto",
    reference_options=None,
    candidate_options=None,
    latents: str | Path | DecoderInputs | None = None,
    n_frames: int = 32,
    seed: int = 0,
    tolerances: Tolerances | None = None,
    batch: int = 1,
    compute_ssim: bool = True,
) -> Comparison:
    """`avatarq.measure.compare` of two backends of a bundle: what ``avatarq compare`` runs.

    Args:
        bundle: bundle directory (or an opened `Bundle`).
        reference, candidate: backend names (`avatarq.engines.registry`); ``auto`` is the
            best engine built for this machine (`resolve_backend`).
        reference_options, candidate_options: `RunOptions` of each runner.
        latents: a latent-sequence .npz (or `DecoderInputs`); None: the smooth clip
            (`avatarq.core.inputs.smooth_clip`) with ``n_frames`` frames and ``seed``.
        tolerances, batch, compute_ssim: as in `avatarq.measure.compare`.
    """
    from avatarq.core.inputs import smooth_clip
    from avatarq.data.latents import load_inputs
    from avatarq.engines.base import RunOptions
    from avatarq.engines.registry import open_runner, resolve_backend
    from avatarq.export.bundle import Bundle, open_bundle

    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    z_dim = opened.manifest.z_dim
    if latents is None:
        inputs = smooth_clip(z_dim, n_frames, seed)
    else:
        inputs = latents if isinstance(latents, DecoderInputs) else load_inputs(latents)
        if inputs.z_dim != z_dim:
            raise AvatarqError(
                f"latent sequence has z of size {inputs.z_dim}, the bundle's decoder takes {z_dim}"
            )
    names = [resolve_backend(opened, name) for name in (reference, candidate)]
    runners = [
        open_runner(opened, name, options or RunOptions())
        for name, options in zip(names, (reference_options, candidate_options), strict=True)
    ]
    if batch < 1 or batch > min(r.max_batch for r in runners):
        raise AvatarqError(f"batch must be 1..{min(r.max_batch for r in runners)}, got {batch}")
    with runners[0] as ref, runners[1] as cand:
        result = compare(
            ref,
            cand,
            inputs,
            tolerances,
            output_names=[spec.name for spec in ref.outputs],
            peak=bundle_peak(opened),
            batch=batch,
            compute_ssim=compute_ssim,
        )
    result.extra["bundle"] = str(opened.root)
    result.extra["backends"] = {"reference": names[0], "candidate": names[1]}
    return result
