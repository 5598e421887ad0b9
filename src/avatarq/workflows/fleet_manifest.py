"""The fleet manifest: which identities `avatarq fleet` compiles, and how, as a typed document.

A fleet manifest is JSON (or TOML on Python 3.11+, by the ``.toml`` suffix)::

    {
      "version": 1,
      "defaults": {"precision": "int8", "calibration": {"method": "poca"}},
      "identities": [
        {"name": "alice", "checkpoint": "alice/dam.pt", "capture": "alice/capture"},
        {"name": "bob", "checkpoint": "bob/dam.pt", "latents": "bob/latents.npz",
         "options": {"build": {"backend": "tensorrt-rtx"}}}
      ]
    }

Paths are relative to the manifest's folder (absolute paths are taken as they are). An
identity's ``options`` are merged key by key over ``defaults`` (nested tables too), and the
result is one `IdentityOptions`. `load_fleet` validates everything before any work starts:
types and unknown keys (strict, like every avatarq document), names, that every input
exists, and each identity's calibration, export and build settings; the first problem is
one `AvatarqError` naming the identity and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from avatarq.core.documents import DOCUMENT_CONFIG, MAX_DOCUMENT_BYTES, parse_document
from avatarq.core.engine_profile import EngineProfile
from avatarq.errors import AvatarqError

FLEET_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Files `avatarq fleet` writes at the top of its output folder (no identity may use them).
SUMMARY_FILE = "fleet-summary.json"
INDEX_MD = "index.md"
INDEX_HTML = "index.html"
RESERVED_NAMES = frozenset({SUMMARY_FILE, INDEX_MD, INDEX_HTML})


@dataclass(frozen=True)
class FleetCalibration:
    """How an INT8 identity is calibrated (the knobs of `avatarq calibrate`).

    Attributes:
        method: "poca" or "max" (standard PTQ, no masks).
        tau: std-mask threshold in [0, 1).
        bits: bit width of weights and activations (8 or 6).
        iters: Adam iterations per layer (upper bound).
        samples: random (frame, camera) or latent-step samples.
        temporal_weight: weight of the temporal term (>= 0).
        adaround: learn the weight rounding.
        asymmetric: asymmetric activations (ONNX Runtime targets only).
        fp16_budget: most sensitive layers kept in FP16.
        layer_precision: per-layer overrides {layer name: "int8" | "fp16" | "fp32"}.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    method: str = "poca"
    tau: float = 0.0
    bits: int = 8
    iters: int = 100
    samples: int = 64
    temporal_weight: float = 0.0
    adaround: bool = False
    asymmetric: bool = False
    fp16_budget: int = 0
    layer_precision: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetExport:
    """How the bundle is exported (the knobs of `avatarq export`).

    Attributes:
        max_batch: upper bound of the graph's dynamic batch (1..4096).
        validate: check the graph with ONNX Runtime against PyTorch (or the calibrated
            fake-quant numerics for INT8) and fail the identity when they disagree.
        n_validation: validation samples (2..4096).
        conv_transpose_axis: ConvTranspose weight-scale axis: 1, 0 or "tensor".
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    max_batch: int = 64
    validate: bool = True
    n_validation: int = 8
    conv_transpose_axis: Literal[0, 1, "tensor"] = 1


@dataclass(frozen=True)
class FleetBuild(EngineProfile):
    """Which engine is built and how (the knobs of `avatarq build`): ``backend``, one that
    builds an engine (onnxruntime, tensorrt-rtx or tensorrt), and the `EngineProfile`
    (batch profile, TensorRT optimization level, TensorRT-RTX compute capabilities, timing
    cache, the ONNX Runtime rewrite)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    backend: str = "onnxruntime"

    def __post_init__(self) -> None:
        """Checked per identity, after the defaults are merged (`check_options` names the
        identity and the section); not while the document is read."""


@dataclass(frozen=True)
class IdentityOptions:
    """Everything that decides one identity's bundle and engine (hashed for resume).

    Attributes:
        precision: "int8" (calibrate, then export with Q/DQ), "fp16" or "fp32" (no calibration).
        camera: fold this camera's colour correction into the texture (None: none).
        seed: seed of the calibration samples and of the validation inputs.
        calibration, export, build: the settings of each phase.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    precision: Literal["int8", "fp16", "fp32"] = "int8"
    camera: int | None = None
    seed: int = 0
    calibration: FleetCalibration = field(default_factory=FleetCalibration)
    export: FleetExport = field(default_factory=FleetExport)
    build: FleetBuild = field(default_factory=FleetBuild)


@dataclass(frozen=True)
class IdentityEntry:
    """One identity as the manifest lists it (paths as written there).

    Attributes:
        name: its folder under the output: letters, digits, ``.``, ``_``, ``-`` (128 at most).
        checkpoint: its Multiface-format DAM checkpoint.
        capture: its capture root (normalization, topology, cameras; calibration data when
            no latents are given).
        latents: a latent-sequence .npz: the calibration data and the engine check's inputs.
            With neither, an INT8 identity is calibrated data-free (from the latent prior).
        options: merged over the manifest's ``defaults`` key by key.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    name: str
    checkpoint: str
    capture: str | None = None
    latents: str | None = None
    options: IdentityOptions = field(default_factory=IdentityOptions)


@dataclass(frozen=True)
class FleetManifest:
    """The whole document: a version, the default options and the identities."""

    __pydantic_config__ = DOCUMENT_CONFIG

    version: int
    identities: list[IdentityEntry]
    defaults: IdentityOptions = field(default_factory=IdentityOptions)

    def __post_init__(self) -> None:
        if self.version != FLEET_VERSION:
            raise AvatarqError(
                f"version is {self.version!r}; this avatarq reads fleet manifests of version "
                f"{FLEET_VERSION}"
            )
        if not self.identities:
            raise AvatarqError("identities is empty; list at least one identity")


@dataclass(frozen=True)
class IdentityTask:
    """One identity, resolved: absolute paths and final options (what a worker receives).

    Attributes:
        name: the identity's name.
        checkpoint, capture, latents: absolute paths (capture and latents may be None).
        out_dir: absolute path of the identity's output folder.
        options: the merged options.
        threads: intra-op threads the worker gives torch and ONNX Runtime (0: their default).
    """

    name: str
    checkpoint: str
    capture: str | None
    latents: str | None
    out_dir: str
    options: IdentityOptions
    threads: int = 0


@dataclass(frozen=True)
class FleetPlan:
    """A validated fleet: where its manifest is and the identities in manifest order."""

    manifest: Path
    identities: tuple[IdentityEntry, ...]

    @property
    def root(self) -> Path:
        """The folder the manifest's relative paths start from."""
        return self.manifest.parent

    def tasks(self, out: Path, threads: int = 0) -> list[IdentityTask]:
        """One `IdentityTask` per identity, writing into ``out/<name>/``."""
        out = Path(out).resolve()

        def absolute(path: str | None) -> str | None:
            return None if path is None else str((self.root / path).resolve())

        return [
            IdentityTask(
                name=e.name,
                checkpoint=str(absolute(e.checkpoint)),
                capture=absolute(e.capture),
                latents=absolute(e.latents),
                out_dir=str(out / e.name),
                options=e.options,
                threads=threads,
            )
            for e in self.identities
        ]


def _merge(base: Any, override: Any) -> Any:
    """``override`` merged over ``base`` key by key (nested objects too)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def _read_raw(path: Path, what: str) -> Any:
    """The manifest's data as Python values (JSON, or TOML by suffix)."""
    if not path.is_file():
        raise AvatarqError(f"{what} not found" if not path.exists() else f"{what} is not a file")
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        raise AvatarqError(f"{what} is {path.stat().st_size} bytes; not a fleet manifest")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise AvatarqError(
                f"{what}: TOML fleet manifests need Python 3.11+; use JSON"
            ) from None
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AvatarqError(f"{what} is not valid TOML ({exc})") from None
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = getattr(exc, "msg", type(exc).__name__)
        raise AvatarqError(f"{what} is not valid JSON ({reason})") from None


def _to_json(data: Any, what: str) -> str:
    try:
        return json.dumps(data)
    except (TypeError, ValueError) as exc:  # TOML dates and times have no JSON form
        raise AvatarqError(f"{what} holds a value JSON cannot express ({exc})") from None


def _resolved_document(data: Any, what: str) -> FleetManifest:
    """Validate the document as written (errors point where the user wrote them), then merge
    every identity's options over the defaults and validate the result."""
    parse_document(_to_json(data, what), FleetManifest, what)
    defaults = data.get("defaults", {})
    merged = dict(data)
    merged["identities"] = [
        {**entry, "options": _merge(defaults, entry.get("options", {}))}
        for entry in data["identities"]
    ]
    return parse_document(_to_json(merged, what), FleetManifest, what)


def _check_identity(entry: IdentityEntry, root: Path) -> None:
    """Names, inputs on disk and each phase's settings of one identity (AvatarqError)."""
    from avatarq.engines.registry import get_backend

    if not NAME_PATTERN.fullmatch(entry.name) or entry.name in RESERVED_NAMES:
        raise AvatarqError(
            "name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit, not {', '.join(sorted(RESERVED_NAMES))}), got {entry.name!r}"
        )
    for kind, path, want_dir in (
        ("checkpoint", entry.checkpoint, False),
        ("capture", entry.capture, True),
        ("latents", entry.latents, False),
    ):
        if path is None:
            continue
        full = root / path
        if not full.exists():
            raise AvatarqError(f"{kind} {path!r} not found (paths are relative to {root})")
        if want_dir and not full.is_dir():
            raise AvatarqError(f"{kind} {path!r} is not a folder (expected a capture root)")
        if not want_dir and not full.is_file():
            raise AvatarqError(f"{kind} {path!r} is not a file")
    o = entry.options
    for section, check in (
        ("calibration", lambda: calibration_config(o)),
        ("export", lambda: export_options(o, calib=None)),
        ("build", lambda: build_options(o, latents=None)),
    ):
        try:
            check()
        except AvatarqError as exc:
            raise AvatarqError(f"{section}: {exc}") from None
    backend = get_backend(o.build.backend)
    if backend.builder is None:
        raise AvatarqError(
            f"build.backend {o.build.backend!r} builds no engine; use onnxruntime, "
            "tensorrt-rtx or tensorrt"
        )


def calibration_config(options: IdentityOptions):  # noqa: ANN201 - a CalibrationConfig
    """The `CalibrationConfig` an identity calibrates with."""
    from avatarq.calibration.config import CalibrationConfig

    c = options.calibration
    if isinstance(c.samples, bool) or c.samples < 1:
        raise AvatarqError(f"samples must be >= 1, got {c.samples!r}")
    return CalibrationConfig(
        method=c.method,
        tau=c.tau,
        bits=c.bits,
        iters=c.iters,
        temporal_weight=c.temporal_weight,
        adaround=c.adaround,
        symmetric=not c.asymmetric,
        fp16_budget=c.fp16_budget,
        precision=dict(c.layer_precision),
        seed=options.seed,
    )


def export_options(options: IdentityOptions, calib: str | None):  # noqa: ANN201
    """The `ExportOptions` an identity exports with (``calib``: its calibration folder)."""
    from avatarq.export.options import ExportOptions

    e = options.export
    axis = None if e.conv_transpose_axis == "tensor" else e.conv_transpose_axis
    return ExportOptions(
        fp16=options.precision == "fp16",
        camera=options.camera,
        max_batch=e.max_batch,
        validate=e.validate,
        n_validation=e.n_validation,
        seed=options.seed,
        int8=options.precision == "int8",
        calib=calib,
        conv_transpose_axis=axis,
    )


def build_options(options: IdentityOptions, latents: str | None):  # noqa: ANN201
    """The `BuildOptions` an identity's engine is built with (``latents``: the check's inputs)."""
    from avatarq.export.manifest import BuildOptions

    return BuildOptions(**options.build.profile(), calibration_latents=latents)


def load_fleet(path: str | Path) -> FleetPlan:
    """Read and validate the fleet manifest at ``path`` (see the module docstring).

    Raises:
        AvatarqError: one line naming the manifest, the identity and the field at fault.
    """
    path = Path(path)
    what = f"fleet manifest {path}"
    data = _read_raw(path, what)
    if not isinstance(data, dict):
        raise AvatarqError(f"{what} must hold an object with version and identities")
    document = _resolved_document(data, what)
    root = path.resolve().parent
    seen: dict[str, str] = {}
    for k, entry in enumerate(document.identities):
        try:
            _check_identity(entry, root)
        except AvatarqError as exc:
            raise AvatarqError(f"{what}: identity {entry.name!r} (#{k}): {exc}") from None
        folded = entry.name.casefold()  # one folder per identity on case-insensitive disks too
        if folded in seen:
            raise AvatarqError(
                f"{what}: identity name {entry.name!r} (#{k}) repeats {seen[folded]!r}; names "
                "must be unique (ignoring case)"
            )
        seen[folded] = entry.name
    return FleetPlan(path.resolve(), tuple(document.identities))
