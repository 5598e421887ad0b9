"""Release gates: `METRIC OP NUMBER` thresholds on measured values (`avatarq bench --gate`)."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from avatarq.core.documents import json_float
from avatarq.errors import AvatarqError

#: Canonical gate metric -> what it tests. Latency names match `LatencyStats.gate_values`.
GATE_METRICS: dict[str, str] = {
    "psnr": "mean PSNR over frames, dB",
    "psnr_min": "lowest per-frame PSNR, dB",
    "ssim": "mean SSIM over frames",
    "jitter_ratio": "jitter ratio J in [0, 2] (alias J)",
    "tde": "temporal difference error, mean |e_t - e_{t-1}|",
    "fe": "flicker excess FE (alias flicker_excess)",
    "jod": "perceptual video quality in JOD, 10 = identical (needs a perceptual metric)",
    "p50_ms": "median latency, ms",
    "p90_ms": "90th percentile latency, ms",
    "p99_ms": "99th percentile latency, ms",
    "mean_ms": "mean latency, ms",
    "fps": "frames per second (alias frames_per_second)",
}
_ALIASES = {"j": "jitter_ratio", "flicker_excess": "fe", "frames_per_second": "fps"}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([^<>=!\s]\S*)\s*$")
_KNOWN_TEXT = (
    "psnr, psnr_min, ssim, J (jitter_ratio), tde, fe, jod, p50_ms, p90_ms, p99_ms, mean_ms, fps"
)


def canonical_metric(name: str) -> str | None:
    """Canonical gate metric for `name` (case-insensitive, aliases resolved), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in GATE_METRICS else None


@dataclass(frozen=True)
class Gate:
    """One release gate: `metric op threshold`, e.g. Gate("psnr", ">=", 40.0)."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        metric = canonical_metric(self.metric)
        if metric is None:
            raise AvatarqError(f"unknown gate metric {self.metric!r}; known: {_KNOWN_TEXT}")
        if self.op not in _OPS:
            raise AvatarqError(f"unknown gate operator {self.op!r}; use one of >=, <=, >, <")
        if not math.isfinite(self.threshold):
            raise AvatarqError(f"gate threshold must be finite, got {self.threshold!r}")
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "threshold", float(self.threshold))

    def check(self, value: float) -> bool:
        """Whether `value` passes; NaN never passes."""
        return bool(_OPS[self.op](float(value), self.threshold))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class GateResult:
    """A gate, the value it saw, and whether it passed; truthy when it passed."""

    gate: Gate
    value: float
    passed: bool

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{self.gate}: {self.value:.6g} {'PASS' if self.passed else 'FAIL'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": str(self.gate),
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": json_float(self.value),
            "passed": self.passed,
        }


def parse_gates(text: str) -> list[Gate]:
    """Parse comma-separated gates, e.g. "psnr>=40,J<=0.5,p99_ms<=20,tde<=0.01".

    Each part is METRIC OP NUMBER with OP one of >=, <=, >, < and METRIC from
    `GATE_METRICS` (case-insensitive; J = jitter_ratio). Raises AvatarqError naming the
    bad part on anything else.
    """
    parts = text.split(",")
    if not text.strip():
        raise AvatarqError(f"no gate given; write e.g. psnr>=40,J<=0.5 (metrics: {_KNOWN_TEXT})")
    gates = []
    for part in parts:
        m = _GATE_RE.match(part)
        if m is None:
            raise AvatarqError(
                f"malformed gate {part.strip()!r} in {text!r}: expected METRIC OP NUMBER "
                f"with OP one of >=, <=, >, < (e.g. psnr>=40); metrics: {_KNOWN_TEXT}"
            )
        name, op, number = m.groups()
        if canonical_metric(name) is None:
            raise AvatarqError(
                f"unknown gate metric {name!r} in {part.strip()!r}; known: {_KNOWN_TEXT}"
            )
        try:
            threshold = float(number)
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise AvatarqError(
                f"gate {part.strip()!r}: threshold {number!r} is not a finite number"
            )
        gates.append(Gate(name, op, threshold))
    return gates


def evaluate_gates(gates: Iterable[Gate], values: Mapping[str, float]) -> list[GateResult]:
    """Check each gate against `values` (keys: gate metric names or aliases).

    Extra values are ignored; a gate whose metric is missing raises AvatarqError (the
    run did not measure it), listing what was measured.
    """
    canon = {}
    for key, value in values.items():
        c = canonical_metric(key)
        if c is not None:
            canon[c] = value
    results = []
    for gate in gates:
        if gate.metric not in canon:
            raise AvatarqError(
                f"gate {gate} needs metric {gate.metric!r}, which this run did not measure "
                f"(measured: {', '.join(sorted(canon)) or 'nothing'})"
            )
        value = float(canon[gate.metric])
        results.append(GateResult(gate, value, gate.check(value)))
    return results
