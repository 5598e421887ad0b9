"""Pass/fail thresholds of a comparison (`Tolerances`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from avatarq.core.documents import DOCUMENT_CONFIG
from avatarq.errors import AvatarqError

TOLERANCES_VERSION = 1


def _check_tol(name: str, value: float | None, lo: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AvatarqError(f"tolerance {name} must be a finite number or None, got {value!r}")
    if lo is not None and value < lo:
        raise AvatarqError(f"tolerance {name} must be >= {lo}, got {value}")


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail thresholds of a `SequenceComparison`; None = not checked.

    Attributes:
        min_psnr: lowest allowed mean PSNR over frames, dB.
        min_psnr_frame: lowest allowed PSNR of any single frame, dB.
        min_psnr_all: lowest allowed PSNR of the mean squared error over all frames, dB.
        min_ssim: lowest allowed mean SSIM (needs SSIM computed).
        max_jitter_ratio: highest allowed jitter ratio J (in [0, 2]).
        max_tde: highest allowed temporal difference error (mean |e_t - e_{t-1}|).
        max_flicker_excess: highest allowed flicker excess FE.
        max_abs_error: highest allowed |Q - F| anywhere (on the mask).
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    min_psnr: float | None = None
    min_psnr_frame: float | None = None
    min_ssim: float | None = None
    max_jitter_ratio: float | None = None
    max_tde: float | None = None
    max_flicker_excess: float | None = None
    max_abs_error: float | None = None
    min_psnr_all: float | None = None
    version: int = TOLERANCES_VERSION

    def __post_init__(self) -> None:
        if self.version != TOLERANCES_VERSION:
            raise AvatarqError(
                f"tolerances version {self.version!r} is not supported (expected "
                f"{TOLERANCES_VERSION}); upgrade avatarq or rewrite the tolerances"
            )
        for name in (
            "min_psnr",
            "min_psnr_frame",
            "min_psnr_all",
            "min_ssim",
            "max_flicker_excess",
        ):
            _check_tol(name, getattr(self, name))
        for name in ("max_jitter_ratio", "max_tde", "max_abs_error"):
            _check_tol(name, getattr(self, name), lo=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tolerances:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AvatarqError(f"unknown tolerance field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
