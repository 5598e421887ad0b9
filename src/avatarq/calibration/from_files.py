"""`calibrate_checkpoint`: what `avatarq calibrate` does, from files on disk to an artifact."""

from __future__ import annotations

from pathlib import Path

from avatarq.calibration.artifact import CalibrationArtifact
from avatarq.calibration.config import CalibrationConfig, check_layer_names
from avatarq.calibration.layers import discover_layers
from avatarq.calibration.pipeline import calibrate
from avatarq.calibration.samples import (
    CalibrationSamples,
    samples_from_capture,
    samples_from_latents,
    samples_from_prior,
)
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError
from avatarq.models.dam import DeepAppearanceModel
from avatarq.models.deploy import DeployableDecoder


def load_samples(
    model: DeepAppearanceModel,
    data: str | Path | None,
    capture=None,
    n_random: int = 64,
    n_clips: int = 2,
    clip_length: int = 8,
    seed: int = 0,
) -> CalibrationSamples:
    """Calibration samples from a capture root, a latent .npz file, or (``data`` None and
    no capture) data-free from the latent prior (`samples_from_prior`)."""
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.latents import load_inputs

    if data is None and capture is not None:
        return samples_from_capture(model, capture, n_random, n_clips, clip_length, seed)
    if data is None:
        return samples_from_prior(model.config.z_dim, n_random, n_clips, clip_length, seed)
    path = Path(data)
    if path.is_dir():
        capture = capture or MultifaceCapture(path)
        return samples_from_capture(model, capture, n_random, n_clips, clip_length, seed)
    if path.suffix == ".npz" or path.is_file():
        sequence = load_inputs(path)
        if sequence.z_dim != model.config.z_dim:
            raise AvatarqError(
                f"{path} holds latents of size {sequence.z_dim}, the model's is {model.config.z_dim}"
            )
        return samples_from_latents(sequence, n_random, n_clips, clip_length, seed, capture)
    raise AvatarqError(f"calibration data not found: {path} (a capture root or a latents .npz)")


def calibrate_decoder(
    model: DeepAppearanceModel,
    data: str | Path | None,
    capture_root: str | Path | None,
    config: CalibrationConfig,
    n_random: int = 64,
    camera: int | None = None,
    progress: Progress | None = None,
) -> tuple[DeployableDecoder, CalibrationArtifact]:
    """Calibrate the deployable decoder of ``model`` (normalization from ``capture_root``)
    on ``data`` (capture root, latent file, or None: the capture, else data-free).

    The decoder is built exactly as `export_bundle` builds it, so the artifact's model hash
    matches at export time.
    """
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization

    capture = None
    if capture_root is not None:
        capture = MultifaceCapture(capture_root)
    elif data is not None and Path(data).is_dir():
        capture = MultifaceCapture(data)
    normalization = capture_normalization(capture) if capture is not None else None
    decoder = DeployableDecoder(model, normalization, camera)
    names = [info.name for info in discover_layers(decoder)]
    check_layer_names(config.precision, names)  # the plan's names, before any work
    if config.fp16_budget > len(names):
        raise AvatarqError(
            f"--fp16-budget {config.fp16_budget} exceeds the decoder's {len(names)} "
            "quantizable layers"
        )
    if progress is not None:
        progress("reading calibration data")
    samples = load_samples(model, data, capture, n_random=n_random, seed=config.seed)
    return decoder, calibrate(decoder, samples, config, progress)


def calibrate_declared(
    decoder,
    data: str | Path | None,
    config: CalibrationConfig,
    n_random: int = 64,
    progress: Progress | None = None,
) -> CalibrationArtifact:
    """Calibrate a declared decoder (`avatarq.models.declare`) on a latent .npz holding
    its inputs by name (``data``; required: a declared decoder has no known prior)."""
    from avatarq.calibration.samples import check_samples
    from avatarq.data.latents import load_inputs
    from avatarq.models.declaration import declaration_of

    declaration = declaration_of(decoder)
    names = [info.name for info in discover_layers(decoder)]
    check_layer_names(config.precision, names)
    if config.fp16_budget > len(names):
        raise AvatarqError(
            f"--fp16-budget {config.fp16_budget} exceeds the decoder's {len(names)} "
            "quantizable layers"
        )
    if data is None or Path(data).is_dir():
        raise AvatarqError(
            "your own decoder calibrates on --data latents.npz holding its inputs "
            f"({', '.join(str(s) for s in declaration.inputs)})"
        )
    samples = samples_from_latents(load_inputs(data), n_random, seed=config.seed)
    check_samples(decoder, samples)
    return calibrate(decoder, samples, config, progress)
