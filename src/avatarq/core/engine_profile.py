"""The engine knobs every build states: the batch profile, TensorRT's optimization level,
TensorRT-RTX's compute capabilities, the timing cache and the ONNX Runtime rewrite.

`avatarq.export.manifest.BuildOptions` (what a bundle records) and a fleet manifest's
``build`` section both extend `EngineProfile`. Torch-free, so documents can be read without it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from avatarq.core.documents import DOCUMENT_CONFIG
from avatarq.errors import AvatarqError


def positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raise `AvatarqError` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AvatarqError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EngineProfile:
    """The engine knobs every build states (`BuildOptions`, a fleet manifest's ``build``).

    Attributes:
        min_batch, opt_batch, max_batch: the optimization profile of the batch dimension
            (TensorRT); the runner preallocates for max_batch.
        optimization_level: TensorRT builder optimization level, 0 (fastest build) .. 5.
        compute_capabilities: TensorRT-RTX targets such as ``("sm86", "sm89")``; empty =
            the library's default (portable to Ampere and later: 8.0, 8.6, 8.9, 12.x).
        timing_cache: keep a TensorRT timing cache beside the engine and reuse it.
        ort_rewrite: ONNX Runtime: rewrite ConvTranspose layers into phase convolutions
            (`avatarq.export.rewrite_ort`), the INT8 CPU path for Q/DQ graphs.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    optimization_level: int = 3
    compute_capabilities: tuple[str, ...] = ()
    timing_cache: bool = True
    ort_rewrite: bool = True

    def profile(self) -> dict[str, Any]:
        """This profile's fields (without those of a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(EngineProfile)}

    def __post_init__(self) -> None:
        for name in ("min_batch", "opt_batch", "max_batch"):
            positive_int(name, getattr(self, name))
        if self.max_batch > 4096:
            raise AvatarqError(f"max_batch must be at most 4096, got {self.max_batch}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise AvatarqError(
                f"batch profile must satisfy min <= opt <= max, got {self.min_batch}, "
                f"{self.opt_batch}, {self.max_batch}"
            )
        positive_int("optimization_level", self.optimization_level, 0)
        if self.optimization_level > 5:
            raise AvatarqError(f"optimization_level must be 0..5, got {self.optimization_level}")
        caps = tuple(str(c).lower() for c in self.compute_capabilities)
        bad = [c for c in caps if not (c.startswith("sm") and c[2:].isdigit())]
        if bad:
            raise AvatarqError(
                f"compute capabilities are written like sm86 or sm120, got {', '.join(bad)}"
            )
        object.__setattr__(self, "compute_capabilities", caps)
