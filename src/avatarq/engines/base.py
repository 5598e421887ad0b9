"""Builders and runners behind one small interface, and the registry of backends.

A *builder* turns a bundle's model.onnx into an engine file under ``bundle/engines/`` and
returns the `EngineRecord` that goes into the manifest. A *runner* loads what a backend
runs (an engine, an ONNX graph, a checkpoint) and decodes::

    with open_runner("dam.avq", "onnxruntime") as runner:
        texture, vertices = runner.decode(z, view)

``decode(z float32 [B, Z], view float32 [B, 3])`` returns (texture float32 [B, 3, T, T],
vertices float32 [B, V, 3]) as numpy arrays that are views of the runner's preallocated
output buffers (allocated once for batch 1..max_batch): the next call overwrites them, so
copy what you keep. Inputs are checked against the manifest's I/O description before
anything runs; a mismatch is an `AvatarqError` naming the input, the expected and the
actual shape or dtype. Each runner records its own wall-clock time per call.

Backends are registered by name in `avatarq.engines.registry`.
"""

from __future__ import annotations

import abc
import collections
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatarq.core.documents import known_fields
from avatarq.core.files import inside
from avatarq.core.hashing import file_sha256
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError
from avatarq.export.bundle import ENGINES_DIR, Bundle, EngineRecord, TensorSpec
from avatarq.export.manifest import BuildOptions

OPTIONS_VERSION = 1  # RunOptions
TIMINGS_KEPT = 4096


# --------------------------------------------------------------------------- options


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AvatarqError(f"{name} must be an integer >= {minimum}, got {value!r}")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunOptions:
    """How a runner runs; each backend reads the fields that concern it.

    Attributes:
        device: ``cpu``, ``cuda`` or ``auto``: for torch, CUDA when torch sees a GPU; for
            ONNX Runtime, its CUDA provider when installed (onnxruntime-gpu); TensorRT
            always runs on CUDA.
        threads: ONNX Runtime intra-op threads (0 = its default).
        spin_wait: ONNX Runtime: let idle intra-op threads spin between operators (a little
            faster on a dedicated CPU, much slower on a shared one; off by default).
        max_batch: largest batch the runner preallocates for (None: the engine's profile,
            else 8).
        checkpoint: torch runner: the checkpoint the bundle was exported from.
        capture: torch runner: the capture root, needed when the bundle has its
            de-normalization folded in.
        fp16: torch runner: run the decoder in float16 (float32 in and out).
        cuda_graph: TensorRT runners: replay each batch size from a captured CUDA graph.
        version: schema version.
    """

    device: str = "auto"
    threads: int = 0
    spin_wait: bool = False
    max_batch: int | None = None
    checkpoint: str | None = None
    capture: str | None = None
    fp16: bool = False
    cuda_graph: bool = False
    version: int = OPTIONS_VERSION

    def __post_init__(self) -> None:
        if self.version != OPTIONS_VERSION:
            raise AvatarqError(
                f"run options version {self.version!r} is not supported (expected {OPTIONS_VERSION})"
            )
        if self.device not in DEVICES:
            raise AvatarqError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _positive_int("threads", self.threads, 0)
        if self.max_batch is not None:
            _positive_int("max_batch", self.max_batch)
        for name in ("checkpoint", "capture"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` (``auto`` asks torch whether a GPU is there)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunOptions:
        return cls(**known_fields(cls, data, "run option"))


# --------------------------------------------------------------------------- runner


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Runner(abc.ABC):
    """Runs the decoder: ``decode(z, view) -> (texture, vertices)``.

    Subclasses implement `_activate`, `_deactivate` and `_run`; this class validates
    inputs against the bundle's I/O description, owns the preallocated output buffers,
    and times every call.

    Args:
        inputs, outputs: the manifest's `TensorSpec`s (dimension ``"batch"`` is dynamic).
        max_batch: largest batch accepted; output buffers hold this many.
        name: a label for messages and comparisons.
    """

    backend: ClassVar[str] = ""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch: int,
        name: str = "",
    ) -> None:
        _positive_int("max_batch", max_batch)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.max_batch = max_batch
        self.min_batch = 1  # a TensorRT profile may start higher
        self.name = name or self.backend
        self.is_active = False
        self.timings_ms: collections.deque[float] = collections.deque(maxlen=TIMINGS_KEPT)
        self._buffers: dict[str, np.ndarray] = {}

    @classmethod
    def engines_in(cls, bundle: Bundle) -> list[EngineRecord]:
        """The engine records of this runner's backend in ``bundle``, oldest first."""
        return [e for e in bundle.manifest.engines if e.backend == cls.backend]

    @classmethod
    def can_run(cls, bundle: Bundle) -> bool:
        """Whether this backend can run ``bundle`` on this machine (what ``auto`` asks)."""
        return True

    # -- lifecycle

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load what the backend runs and allocate buffers (idempotent)."""
        if self.is_active:
            return
        self._activate()
        self._buffers = {
            spec.name: self._allocate(spec, self._concrete(spec, self.max_batch))
            for spec in self.outputs
        }
        self.is_active = True

    def deactivate(self) -> None:
        """Free the backend's resources (idempotent)."""
        if not self.is_active:
            return
        try:
            self._deactivate()
        finally:
            self._buffers = {}
            self.is_active = False

    # -- running

    def decode(self, z: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z float32 [B, Z], view float32 [B, 3]) -> (texture [B, 3, T, T], vertices [B, V, 3]).

        Both outputs are float32 views of preallocated buffers, valid until the next call.
        """
        out = self.infer({"z": z, "view": view})
        return out["texture"], out["vertices"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """`infer` with the outputs as a tuple in the manifest's output order (the
        `avatarq.measure.Decoder` protocol the comparator runs)."""
        out = self.infer(feeds)
        return tuple(out[spec.name] for spec in self.outputs)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feed`` ({input name: array}); returns {output name: array view}."""
        if not self.is_active:
            raise AvatarqError(
                f"runner {self.name} is not active; use it as a context manager or call activate()"
            )
        arrays, batch = self.check_inputs(feed)
        outputs = {spec.name: self._buffers[spec.name][:batch] for spec in self.outputs}
        start = time.perf_counter_ns()
        self._run(arrays, outputs, batch)
        self.timings_ms.append((time.perf_counter_ns() - start) / 1e6)
        return outputs

    @property
    def last_inference_ms(self) -> float | None:
        """Wall-clock milliseconds of the latest call (None before the first)."""
        return self.timings_ms[-1] if self.timings_ms else None

    def check_inputs(self, feed: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Validate ``feed`` against the input specs: ({name: C-contiguous array}, batch)."""
        if not isinstance(feed, Mapping):
            raise AvatarqError(f"inputs must be a mapping name -> array, got {type(feed).__name__}")
        expected = [spec.name for spec in self.inputs]
        if sorted(feed) != sorted(expected):
            raise AvatarqError(
                f"inputs must be exactly {', '.join(expected)}; got {', '.join(sorted(feed)) or 'none'}"
            )
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in self.inputs:
            value = feed[spec.name]
            if not isinstance(value, np.ndarray):
                raise AvatarqError(
                    f"input {spec.name} must be a numpy array, got {type(value).__name__}"
                )
            if value.dtype != np.dtype(spec.dtype):
                raise AvatarqError(
                    f"input {spec.name} must be {spec.dtype}, got {value.dtype}; "
                    f"pass {spec.name}.astype(np.{spec.dtype})"
                )
            shape_ok = value.ndim == len(spec.shape) and all(
                d == "batch" or d == n for d, n in zip(spec.shape, value.shape, strict=True)
            )
            if not shape_ok:
                raise AvatarqError(
                    f"input {spec.name} must have shape {_shape_text(spec.shape)}, "
                    f"got {_shape_text(value.shape)}"
                )
            n = value.shape[0]
            if batch is not None and n != batch:
                raise AvatarqError(
                    f"inputs disagree on the batch size: {self.inputs[0].name} has {batch}, "
                    f"{spec.name} has {n}"
                )
            batch = n
            arrays[spec.name] = np.ascontiguousarray(value)
        if batch is None or not max(1, self.min_batch) <= batch <= self.max_batch:
            raise AvatarqError(
                f"batch size must be {max(1, self.min_batch)}..{self.max_batch} for runner "
                f"{self.name}, got {batch}"
            )
        return arrays, batch

    # -- for subclasses

    @staticmethod
    def _concrete(spec: TensorSpec, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in spec.shape)

    def _allocate(self, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
        """An output buffer; runners copying from a GPU override this with pinned memory."""
        return np.empty(shape, dtype=np.dtype(spec.dtype))

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batch: int
    ) -> None:
        """Fill ``outputs`` (views of the buffers, leading dimension ``batch``)."""


# --------------------------------------------------------------------------- builder


@dataclass
class BuildResult:
    """What `Builder.build` produced: the manifest record and the files it wrote."""

    record: EngineRecord
    files: list[Path] = field(default_factory=list)


class Builder(abc.ABC):
    """Turns a bundle's model.onnx into an engine file under ``bundle/engines/``."""

    backend: ClassVar[str] = ""

    def __init__(self, options: BuildOptions = BuildOptions()) -> None:
        self.options = options

    @abc.abstractmethod
    def target(self) -> str:
        """What the engine is built for (e.g. ``cpu``, ``sm89``, ``ampere+``)."""

    @abc.abstractmethod
    def build(self, bundle: Bundle, progress: Progress | None = None) -> BuildResult:
        """Write the engine into the bundle and return its record (the manifest is not saved)."""

    def engine_path(self, bundle: Bundle, suffix: str = ".engine") -> Path:
        """``bundle/engines/<backend>-<target><suffix>``, refused when ``engines`` (or the
        file) is a link that would make the build write outside the bundle."""
        name = f"{ENGINES_DIR}/{self.backend}-{self.target()}{suffix}"
        return inside(bundle.root, name, "engine")


def checked_engine_file(bundle: Bundle, record: EngineRecord) -> Path:
    """The engine file of ``record``; missing or altered files are an AvatarqError."""
    path = bundle.root / record.path
    rebuild = f"rebuild it: avatarq build {bundle.root} --backend {record.backend}"
    if not path.is_file():
        raise AvatarqError(
            f"engine file {record.path} listed in {bundle.root} is missing; {rebuild}"
        )
    if file_sha256(path) != record.sha256:
        raise AvatarqError(
            f"engine file {record.path} in {bundle.root} is corrupt (its sha256 differs from "
            f"the manifest's); {rebuild}"
        )
    return path
