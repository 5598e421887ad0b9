"""`calibrate_checkpoint`: what `avatarq calibrate` does, from files on disk to an artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from avatarq.calibration.artifact import CalibrationArtifact
from avatarq.calibration.config import CalibrationConfig
from avatarq.calibration.pipeline import calibrate
from avatarq.calibration.samples import (
    CalibrationSamples,
    samples_from_capture,
    samples_from_latents,
)
from avatarq.errors import AvatarqError
from avatarq.models.dam import DeepAppearanceModel
from avatarq.models.deploy import DeployableDecoder


def load_samples(
    model: DeepAppearanceModel,
    data: str | Path,
    capture=None,
    n_random: int = 64,
    n_clips: int = 2,
    clip_length: int = 8,
    seed: int = 0,
) -> CalibrationSamples:
    """Calibration samples from a capture root or a latent-sequence .npz file."""
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.latents import load_inputs

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
    data: str | Path,
    capture_root: str | Path | None,
    config: CalibrationConfig,
    n_random: int = 64,
    camera: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[DeployableDecoder, CalibrationArtifact]:
    """Calibrate the deployable decoder of ``model`` (normalization from ``capture_root``).

    The decoder is built exactly as `export_bundle` builds it, so the artifact's model hash
    matches at export time.
    """
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization

    capture = None
    if capture_root is not None:
        capture = MultifaceCapture(capture_root)
    elif Path(data).is_dir():
        capture = MultifaceCapture(data)
    normalization = capture_normalization(capture) if capture is not None else None
    decoder = DeployableDecoder(model, normalization, camera)
    samples = load_samples(model, data, capture, n_random=n_random, seed=config.seed)
    return decoder, calibrate(decoder, samples, config, progress)
