"""avatarq.measure: the measurement layer under every stage.

Metrics on values in [0, 1] (`images`: PSNR, SSIM), sequences and temporal stability
(`sequence`: tDE, jitter ratio J, flicker excess FE, T-Std), thresholds (`tolerances`, `gates`),
latency statistics and timers (`latency`), the one comparator (`compare`) that export
validation, engine checks, ``avatarq compare``, the runtime and bench all use, and the
optional perceptual video metric (`perceptual`: JOD with FovVideoVDP / ColorVideoVDP). It
imports no stage; numpy only (torch only inside the CUDA timer and the perceptual score,
the perceptual packages only when a score is asked for).
"""

from avatarq.measure.compare import Comparison, Decoder, OutputError, check_finite, compare
from avatarq.measure.gates import (
    GATE_METRICS,
    Gate,
    GateResult,
    canonical_metric,
    evaluate_gates,
    parse_gates,
)
from avatarq.measure.images import psnr, psnr_from_mse, ssim
from avatarq.measure.latency import CudaEventTimer, LatencyStats, time_callable
from avatarq.measure.perceptual import PerceptualClip, PerceptualConfig, PerceptualResult
from avatarq.measure.sequence import (
    SequenceAccumulator,
    SequenceComparison,
    TemporalStd,
    compare_sequences,
    temporal_std,
)
from avatarq.measure.tolerances import Tolerances

__all__ = [
    "GATE_METRICS",
    "Comparison",
    "CudaEventTimer",
    "Decoder",
    "Gate",
    "GateResult",
    "LatencyStats",
    "OutputError",
    "PerceptualClip",
    "PerceptualConfig",
    "PerceptualResult",
    "SequenceAccumulator",
    "SequenceComparison",
    "TemporalStd",
    "Tolerances",
    "canonical_metric",
    "check_finite",
    "compare",
    "compare_sequences",
    "evaluate_gates",
    "parse_gates",
    "psnr",
    "psnr_from_mse",
    "ssim",
    "temporal_std",
    "time_callable",
]
