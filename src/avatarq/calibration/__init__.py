"""POCA calibration: masks, quantizers, layer-wise reconstruction, the calibration artifact.

One verb::

    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_capture
    samples = samples_from_capture(model, capture, n_random=64, seed=0)
    artifact = calibrate(DeployableDecoder(model, normalization), samples, CalibrationConfig())
    artifact.save("calib/")

`FakeQuantDecoder(decoder, artifact)` runs the calibrated numerics in torch (what the
Q/DQ ONNX computes), for validation.
"""

from avatarq.calibration.artifact import (
    ARTIFACT_VERSION,
    CalibrationArtifact,
    LayerCalibration,
    decoder_hash,
)
from avatarq.calibration.config import CalibrationConfig, parse_precision
from avatarq.calibration.fakequant import FakeQuantDecoder
from avatarq.calibration.layers import LayerInfo, discover_layers
from avatarq.calibration.pipeline import METHODS, calibrate
from avatarq.calibration.samples import (
    CalibrationSamples,
    samples_from_capture,
    samples_from_latents,
)

__all__ = [
    "ARTIFACT_VERSION",
    "METHODS",
    "CalibrationArtifact",
    "CalibrationConfig",
    "CalibrationSamples",
    "FakeQuantDecoder",
    "LayerCalibration",
    "LayerInfo",
    "calibrate",
    "decoder_hash",
    "discover_layers",
    "parse_precision",
    "samples_from_capture",
    "samples_from_latents",
]
