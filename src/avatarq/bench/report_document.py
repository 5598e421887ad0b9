"""The typed schema of report.json (`ReportDocument`), validated on load.

`BenchResult.to_dict` writes the report; `load_report` validates the file against
`ReportDocument` (strict JSON, no unknown keys, `avatarq.core.documents`) before turning it
back into a `BenchResult`, and docs/schemas/report.schema.json is generated from it. Numbers
that may be infinite or NaN are `JsonFloat` (written as "Infinity"/"NaN").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avatarq.bench.results import BenchSetup, CodecRecord
from avatarq.core.documents import DOCUMENT_CONFIG, JsonFloat
from avatarq.measure.perceptual import PerceptualResult
from avatarq.measure.tolerances import Tolerances


@dataclass
class LatencyRecord:
    __pydantic_config__ = DOCUMENT_CONFIG

    n: int
    batch: int
    p50_ms: JsonFloat
    p90_ms: JsonFloat
    p99_ms: JsonFloat
    mean_ms: JsonFloat
    std_ms: JsonFloat
    min_ms: JsonFloat
    max_ms: JsonFloat
    frames_per_second: JsonFloat
    samples_ms: list[float] | None = None


@dataclass
class ComparisonRecord:
    """A `avatarq.measure.SequenceComparison` (texture or screen space)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    n_frames: int
    psnr_per_frame: list[JsonFloat]
    ssim_per_frame: list[JsonFloat] | None
    mean_abs_error_per_frame: list[JsonFloat]
    tde_per_frame: list[JsonFloat]
    flicker_excess_per_frame: list[JsonFloat]
    psnr_mean: JsonFloat
    psnr_min: JsonFloat
    psnr_std: JsonFloat
    ssim_mean: JsonFloat | None
    tde: JsonFloat
    tde_rms: JsonFloat
    jitter_ratio: JsonFloat
    flicker_excess: JsonFloat
    max_abs_error: JsonFloat
    mean_abs_error: JsonFloat
    masked: bool
    tolerances: Tolerances
    psnr_all: JsonFloat
    passed: bool
    failures: list[str]
    t_std: JsonFloat | None = None
    t_std_reference: JsonFloat | None = None


@dataclass
class GateRecord:
    __pydantic_config__ = DOCUMENT_CONFIG

    gate: str
    metric: str
    op: str
    threshold: float
    value: JsonFloat
    passed: bool


@dataclass
class RunnerRecord:
    __pydantic_config__ = DOCUMENT_CONFIG

    name: str
    label: str
    latency: dict[str, LatencyRecord]
    texture: ComparisonRecord | None
    screen: ComparisonRecord | None
    gates: list[GateRecord]
    passed: bool
    latency_p50_ratio_vs_reference: dict[str, float] | None = None
    perceptual: PerceptualResult | None = None
    perceptual_space: str | None = None
    codec: CodecRecord | None = None


@dataclass
class ReportDocument(BenchSetup):
    """report.json: settings, what ran, every measurement, gate verdicts, environment.

    ``bundle``, ``sequence``, ``render`` and ``environment`` are descriptive records
    (paths, labels, versions) kept as JSON objects.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    schema_version: int
    created: str
    seconds: float
    passed: bool
    exit_code: int
    verdict: str
    reference: RunnerRecord
    runners: list[RunnerRecord]
    skipped: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
