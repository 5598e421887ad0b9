"""Perceptual video quality: JOD of a deployed clip against its FP32 reference.

Two full-reference video metrics from the same group, both in JOD (just-objectionable
differences; 10 = no visible difference, each unit down = one JOD worse), both optional:

- ``fvvdp``: FovVideoVDP (package ``pyfvvdp``), the metric POCA's and ESCA's papers
  report; run here non-foveated (the whole frame is judged as if looked at);
- ``cvvdp``: ColorVideoVDP (package ``cvvdp``, module ``pycvvdp``), its colour successor.
  It imports torchvision: it runs only where the installed torchvision matches the
  installed torch (a CUDA build of torchvision fails to load with a CPU-only torch).

Install with ``pip install 'avatarq[perceptual]'`` (see docs/benchmarks.md for the
ColorVideoVDP caveat). The packages are imported only when a score is asked for, and a
missing one is an `AvatarqError` naming the extra.

Inputs are display-encoded frames (the decoded texture / 255, or the rendered image, as a
standard SDR display would show them) float [T, H, W, 3] in [0, 1], T >= 2 frames in
temporal order. Values are clipped to [0, 1] (a display shows nothing outside). The metric
runs on the CPU on frames reduced to at most ``max_size`` pixels on their longer side
(box-averaged by an integer factor; `PerceptualClip` also crops to the reference's
foreground first); one frame pixel is one pixel of the display model (``standard_fhd`` by
default: a 24-inch 1920x1080 monitor, 200 cd/m^2, seen from 0.6 m under office light), and
the clip plays at ``fps`` frames per second (30 by default, Multiface's capture rate).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.resources
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from avatarq.core.documents import DOCUMENT_CONFIG, JsonFloat, json_float
from avatarq.errors import AvatarqError

#: metric -> (import name, distribution, display-model file in the package, full name)
METRICS: dict[str, tuple[str, str, str, str]] = {
    "cvvdp": ("pycvvdp", "cvvdp", "vvdp_data/display_models.json", "ColorVideoVDP"),
    "fvvdp": ("pyfvvdp", "pyfvvdp", "fvvdp_data/display_models.json", "FovVideoVDP"),
}
EXTRA = "perceptual"
DEFAULT_METRIC = "fvvdp"
DEFAULT_DISPLAY = "standard_fhd"
DEFAULT_FPS = 30.0
DEFAULT_MAX_SIZE = 256
MAX_JOD = 10.0


@dataclass(frozen=True)
class PerceptualConfig:
    """How the perceptual score is computed.

    Attributes:
        metric: ``fvvdp`` (FovVideoVDP) or ``cvvdp`` (ColorVideoVDP).
        display: a display model the package ships (e.g. ``standard_fhd``,
            ``standard_4k``, ``standard_hmd``).
        fps: frames per second the clip plays at.
        max_size: longest side, in pixels, of the frames scored.
    """

    metric: str = DEFAULT_METRIC
    display: str = DEFAULT_DISPLAY
    fps: float = DEFAULT_FPS
    max_size: int = DEFAULT_MAX_SIZE

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise AvatarqError(
                f"perceptual metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
            )
        if not isinstance(self.display, str) or not self.display:
            raise AvatarqError(f"display must be a display model name, got {self.display!r}")
        fps = self.fps
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf:
            raise AvatarqError(f"fps must be a positive number, got {fps!r}")
        object.__setattr__(self, "fps", float(fps))
        size = self.max_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise AvatarqError(f"max_size must be an integer >= 16 pixels, got {size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PerceptualResult:
    """One clip's perceptual score and what it was computed on.

    Attributes:
        metric: ``fvvdp`` or ``cvvdp``; name: its full name; version: the package version.
        jod: the score in JOD (10 = identical; lower is worse).
        display: display model name; display_description: the package's description.
        fps: frames per second of the clip.
        frames, height, width: the clip as scored (after crop and reduction), pixels.
        downsample: the integer box-filter factor applied to the given frames.
        seconds: wall time of the metric call (CPU); seconds_per_frame: that over frames.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    metric: str
    name: str
    version: str
    jod: JsonFloat
    display: str
    display_description: str
    fps: float
    frames: int
    height: int
    width: int
    downsample: int
    seconds: float
    seconds_per_frame: JsonFloat

    def gate_values(self) -> dict[str, float]:
        """``{"jod": jod}``, for `avatarq.measure.gates.evaluate_gates`."""
        return {"jod": self.jod}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["jod"] = json_float(self.jod)
        d["seconds_per_frame"] = json_float(self.seconds_per_frame)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PerceptualResult:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        missing = sorted(set(cls.__dataclass_fields__) - set(known))
        if missing:
            raise AvatarqError(f"perceptual result lacks field(s) {missing}")
        known["jod"] = float(known["jod"])
        return cls(**known)


# --------------------------------------------------------------------------- the package


def _module(metric: str) -> Any:
    """Import the metric's package, or raise one line naming what to install."""
    module_name, dist, _, full = METRICS[metric]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise AvatarqError(
                f"perceptual metric {metric} ({full}) needs the package {dist}, which is not "
                f"installed; install avatarq's '{EXTRA}' extra: pip install 'avatarq[{EXTRA}]'"
            ) from None
        why = f"its dependency {exc.name} is not installed"
    except Exception as exc:  # a binary dependency that does not load (e.g. torchvision)
        text = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    raise AvatarqError(
        f"perceptual metric {metric} ({full}): package {dist} is installed but cannot be "
        f"imported ({why}); for cvvdp install a torchvision built for this torch"
    )


def require(metric: str) -> None:
    """Raise `AvatarqError` (one line: what to install) unless ``metric`` can run here."""
    if metric not in METRICS:
        raise AvatarqError(f"perceptual metric must be one of {', '.join(METRICS)}, got {metric!r}")
    _module(metric)


def available(metric: str) -> bool:
    """Whether ``metric``'s package imports here."""
    try:
        _module(metric)
    except AvatarqError:
        return False
    return True


def package_version(metric: str) -> str:
    try:
        return importlib.metadata.version(METRICS[metric][1])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def display_models(metric: str) -> dict[str, str]:
    """Display model name -> description, as shipped with ``metric``'s package."""
    module_name, _, path, _ = METRICS[metric]
    _module(metric)
    text = importlib.resources.files(module_name).joinpath(path).read_text()
    return {k: str(v.get("name", k)) for k, v in json.loads(text).items()}


@functools.cache
def _metric_object(metric: str, display: str) -> Any:
    import torch

    module = _module(metric)
    models = display_models(metric)
    if display not in models:
        raise AvatarqError(
            f"unknown display model {display!r} for {metric}; known: {', '.join(sorted(models))}"
        )
    cpu = torch.device("cpu")
    if metric == "cvvdp":
        return module.cvvdp(display_name=display, device=cpu, quiet=True)
    return module.fvvdp(display_name=display, device=cpu, heatmap=None, quiet=True)


# --------------------------------------------------------------------------- frames


def _clip_frames(frames: Any, name: str) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise AvatarqError(f"{name} must be frames [T, H, W, 3], got shape {list(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise AvatarqError(f"{name} must be floating point in [0, 1], got {a.dtype}")
    if not np.isfinite(a).all():
        raise AvatarqError(f"{name} holds NaN or infinite values")
    return a


def reduction_factor(height: int, width: int, max_size: int) -> int:
    """The smallest integer factor that brings max(height, width) to <= max_size."""
    return max(1, math.ceil(max(height, width) / max_size))


def downsample(frames: np.ndarray, factor: int) -> np.ndarray:
    """Box-average [..., H, W, C] by ``factor`` (trailing rows/columns that do not fill a
    box are dropped): float32 [..., H // factor, W // factor, C]."""
    if factor == 1:
        return np.asarray(frames, dtype=np.float32)
    h, w = frames.shape[-3] // factor, frames.shape[-2] // factor
    x = np.asarray(frames[..., : h * factor, : w * factor, :], dtype=np.float64)
    x = x.reshape(*x.shape[:-3], h, factor, w, factor, x.shape[-1])
    return x.mean(axis=(-4, -2)).astype(np.float32)


def score(
    reference: Any, deployed: Any, config: PerceptualConfig | None = None
) -> PerceptualResult:
    """JOD of ``deployed`` against ``reference``, both float [T, H, W, 3] in [0, 1].

    Frames are reduced to ``config.max_size`` (integer box filter), clipped to [0, 1] and
    scored on the CPU with ``config.metric`` on ``config.display`` at ``config.fps``.

    Raises:
        AvatarqError: shapes differ or are not [T >= 2, H, W, 3], non-finite values, the
            package is missing or does not import, unknown display model.
    """
    import torch

    config = config or PerceptualConfig()
    ref = _clip_frames(reference, "reference")
    dep = _clip_frames(deployed, "deployed")
    if ref.shape != dep.shape:
        raise AvatarqError(
            f"reference and deployed clips differ in shape: {list(ref.shape)} vs {list(dep.shape)}"
        )
    if ref.shape[0] < 2:
        raise AvatarqError(f"a video score needs T >= 2 frames, got {ref.shape[0]}")
    factor = reduction_factor(ref.shape[1], ref.shape[2], config.max_size)
    ref = np.clip(downsample(ref, factor), 0.0, 1.0)
    dep = np.clip(downsample(dep, factor), 0.0, 1.0)
    metric = _metric_object(config.metric, config.display)
    start = time.perf_counter()
    with torch.no_grad():
        jod, _ = metric.predict(
            torch.from_numpy(np.ascontiguousarray(dep)),
            torch.from_numpy(np.ascontiguousarray(ref)),
            dim_order="FHWC",
            frames_per_second=config.fps,
        )
    seconds = time.perf_counter() - start
    return PerceptualResult(
        metric=config.metric,
        name=METRICS[config.metric][3],
        version=package_version(config.metric),
        jod=float(jod),
        display=config.display,
        display_description=display_models(config.metric)[config.display],
        fps=config.fps,
        frames=int(ref.shape[0]),
        height=int(ref.shape[1]),
        width=int(ref.shape[2]),
        downsample=factor,
        seconds=seconds,
        seconds_per_frame=seconds / ref.shape[0],
    )


def _box(mask: np.ndarray, margin: float) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask > 0)
    if rows.size == 0:
        return slice(0, mask.shape[0]), slice(0, mask.shape[1])
    h, w = mask.shape
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad = int(math.ceil(margin * max(r1 - r0, c1 - c0)))
    return slice(max(r0 - pad, 0), min(r1 + pad, h)), slice(max(c0 - pad, 0), min(c1 + pad, w))


class PerceptualClip:
    """Collects a clip frame by frame, reduced as it comes, and scores it at the end.

    The first frame fixes the region scored: with a ``mask`` (the reference's foreground,
    [H, W]), its bounding box plus ``margin`` of its size on each side, else the whole
    frame; and the reduction factor that brings that region to ``config.max_size``. Every
    frame is cropped and reduced the same way, so only small frames are held.
    """

    def __init__(self, config: PerceptualConfig | None = None, margin: float = 0.15) -> None:
        self.config = config or PerceptualConfig()
        self.margin = margin
        self._region: tuple[slice, slice] | None = None
        self._factor = 1
        self._shape: tuple[int, ...] | None = None
        self._ref: list[np.ndarray] = []
        self._dep: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._ref)

    def add(self, reference: Any, deployed: Any, mask: Any = None) -> None:
        """Append one frame: ``reference`` and ``deployed`` float [H, W, 3] in [0, 1]."""
        ref, dep = np.asarray(reference), np.asarray(deployed)
        if ref.ndim != 3 or ref.shape[-1] != 3 or ref.shape != dep.shape:
            raise AvatarqError(
                f"frames must be [H, W, 3] of one shape, got {list(ref.shape)} and "
                f"{list(dep.shape)}"
            )
        if self._region is None:
            self._shape = ref.shape
            if mask is None:
                self._region = (slice(0, ref.shape[0]), slice(0, ref.shape[1]))
            else:
                self._region = _box(np.asarray(mask), self.margin)
            rs, cs = self._region
            self._factor = reduction_factor(
                rs.stop - rs.start, cs.stop - cs.start, self.config.max_size
            )
        elif ref.shape != self._shape:
            raise AvatarqError(f"frame shape {list(ref.shape)} differs from {list(self._shape)}")
        rs, cs = self._region
        self._ref.append(downsample(ref[rs, cs], self._factor))
        self._dep.append(downsample(dep[rs, cs], self._factor))

    def result(self) -> PerceptualResult:
        """Score the frames added so far (`score`); ``downsample`` reports the factor used."""
        if len(self) < 2:
            raise AvatarqError(f"a video score needs T >= 2 frames, got {len(self)}")
        out = score(np.stack(self._ref), np.stack(self._dep), self.config)
        return PerceptualResult(**{**asdict(out), "downsample": self._factor})
