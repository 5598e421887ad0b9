"""One identity of a fleet: calibrate -> export -> build into ``OUT/<name>/``, or skip it.

`process_identity` is the task every executor runs (a process-pool worker, a Ray worker). It
never raises for a failing identity: the error becomes one line in the `IdentityResult` it
returns, so one bad identity cannot stop the others. What it leaves on disk::

    OUT/<name>/identity.json   the identity's record (`IdentityResult`), written atomically:
                               "running" before any work, "built" or "failed" at the end
    OUT/<name>/calib/          the calibration artifact (INT8 only; a staged folder)
    OUT/<name>/bundle.avq/     the bundle with its engine (a staged folder)

Resume is derived from that record alone: an identity whose record says "built" with the
same input hash, and whose bundle still opens with its engine, is skipped. The input hash
covers the checkpoint's bytes, the calibration data's bytes (a latent file, every file of a
capture), the merged options and the avatarq version; change any of them and the identity is
built again. A folder at ``OUT/<name>`` that holds no record was not written by
`avatarq fleet` and is never touched (the identity fails instead).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from avatarq import __version__
from avatarq.core.documents import (
    DOCUMENT_CONFIG,
    JsonFloat,
    document_dict,
    dump_document,
    load_document,
)
from avatarq.core.files import atomic_write_text
from avatarq.core.hashing import file_sha256
from avatarq.errors import AvatarqError
from avatarq.workflows.fleet_manifest import (
    IdentityTask,
    build_options,
    calibration_config,
    export_options,
)

RECORD_VERSION = 1
RECORD_FILE = "identity.json"
BUNDLE_DIR = "bundle.avq"
CALIB_DIR = "calib"
Status = Literal["running", "built", "skipped", "failed"]


@dataclass
class PhaseSeconds:
    """Wall seconds of each phase of one identity (0 for a phase that did not run)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    hash: float = 0.0
    calibrate: float = 0.0
    export: float = 0.0
    build: float = 0.0

    @property
    def total(self) -> float:
        return self.hash + self.calibrate + self.export + self.build


@dataclass(frozen=True)
class InputDigests:
    """sha256 (hex) of everything that decides an identity's outputs.

    Attributes:
        checkpoint: the checkpoint file's bytes.
        capture: the capture root's files (relative paths and bytes), or None.
        latents: the latent file's bytes, or None.
        options: the merged options as canonical JSON.
        avatarq: the avatarq version that built the identity (not a digest).
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    checkpoint: str
    capture: str | None
    latents: str | None
    options: str
    avatarq: str

    def sha256(self) -> str:
        """One digest of all of them (what resume compares)."""
        text = json.dumps(document_dict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class IdentityResult:
    """What became of one identity: the record in ``OUT/<name>/identity.json`` and what a
    fleet task returns.

    Attributes:
        name: the identity.
        status: "built" (calibrated, exported and built now), "skipped" (built before from
            the same inputs; only ever returned, never written), "failed", or "running"
            (only on disk, while the identity is in progress or after it was interrupted).
        precision: "int8", "fp16" or "fp32".
        inputs: the digests of its inputs; inputs_sha256: their combined digest.
        seconds: wall seconds per phase in this run (a skipped identity only hashed).
        bundle: the bundle folder, relative to the fleet's output folder.
        backend: the engine's backend; engine: the engine file, relative to the output folder.
        validation_psnr_db: texture PSNR (dB) of the exported graph against the FP32 decoder
            (INT8: the Q/DQ graph vs FP32; FP16/FP32: ONNX Runtime vs PyTorch float32);
            None when validation is off.
        engine_psnr_db: texture PSNR (dB) of the built engine against model.onnx when the
            backend checks it (ONNX Runtime), else None.
        error: the one-line error of a failed identity.
        traceback: the traceback of an unexpected (non-user) error, for the record only.
        version: record schema version.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    name: str
    status: Status
    precision: str
    inputs: InputDigests | None = None
    inputs_sha256: str | None = None
    seconds: PhaseSeconds = field(default_factory=PhaseSeconds)
    bundle: str | None = None
    backend: str | None = None
    engine: str | None = None
    validation_psnr_db: JsonFloat | None = None
    engine_psnr_db: JsonFloat | None = None
    error: str | None = None
    traceback: str | None = None
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        if self.version != RECORD_VERSION:
            raise AvatarqError(
                f"identity record version {self.version!r} is not supported (expected "
                f"{RECORD_VERSION})"
            )


def tree_sha256(root: str | Path) -> str:
    """sha256 over every file under ``root``: sorted relative paths and their bytes' digests."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def input_digests(task: IdentityTask) -> InputDigests:
    """The digests of ``task``'s checkpoint, data and options (reads every input byte)."""
    options = json.dumps(document_dict(task.options), sort_keys=True)
    return InputDigests(
        checkpoint=file_sha256(task.checkpoint),
        capture=None if task.capture is None else tree_sha256(task.capture),
        latents=None if task.latents is None else file_sha256(task.latents),
        options=hashlib.sha256(options.encode()).hexdigest(),
        avatarq=__version__,
    )


def read_record(out_dir: str | Path) -> IdentityResult | None:
    """The record in ``out_dir`` (None when the folder is absent or empty).

    Raises:
        AvatarqError: ``out_dir`` exists and holds no readable record: not a fleet folder.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return None
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise AvatarqError(f"{out_dir} exists and is not a folder; choose another output folder")
    record = out_dir / RECORD_FILE
    if not record.is_file():
        if any(out_dir.iterdir()):
            raise AvatarqError(
                f"{out_dir} exists and was not written by avatarq fleet (no {RECORD_FILE}); "
                "remove it or choose another output folder"
            )
        return None
    return load_document(record, IdentityResult, f"identity record {record}")


def write_record(out_dir: str | Path, result: IdentityResult) -> None:
    """Write ``result`` as ``out_dir/identity.json`` (atomically)."""
    atomic_write_text(Path(out_dir) / RECORD_FILE, dump_document(result))


def _intact(out_dir: Path, record: IdentityResult) -> bool:
    """Whether the bundle a built record names still opens and holds its engine."""
    from avatarq.export import open_bundle
    from avatarq.export.manifest import engine_files

    try:
        bundle = open_bundle(out_dir / BUNDLE_DIR)
    except AvatarqError:
        return False
    for engine in bundle.manifest.engines:
        if engine.backend == record.backend:
            return all((bundle.root / name).is_file() for name in engine_files(engine))
    return False


def _error_line(exc: Exception) -> tuple[str, str | None]:
    """(one line, traceback or None): a user error's message, or an unexpected error's type
    and first line with its traceback kept for the record."""
    if isinstance(exc, AvatarqError):
        return str(exc), None
    lines = str(exc).strip().splitlines()
    first = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return f"internal error: {first}", traceback.format_exc()


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _run_phases(task: IdentityTask, result: IdentityResult) -> None:
    """Calibrate (INT8), export and build into ``task.out_dir``, filling ``result``."""
    from avatarq.calibration.from_files import calibrate_decoder
    from avatarq.engines import build_engine
    from avatarq.export import export_bundle
    from avatarq.models.checkpoint import load_checkpoint

    out_dir = Path(task.out_dir)
    options = task.options
    calib = out_dir / CALIB_DIR
    seconds = result.seconds
    if options.precision == "int8":
        start = time.perf_counter()
        model = load_checkpoint(task.checkpoint)
        data = task.latents if task.latents is not None else task.capture  # None: data-free
        _, artifact = calibrate_decoder(
            model,
            data,
            task.capture,
            calibration_config(options),
            options.calibration.samples,
            options.camera,
        )
        artifact.save(calib)  # staged: the folder appears whole
        seconds.calibrate = time.perf_counter() - start
    elif calib.exists():
        shutil.rmtree(calib)  # an earlier INT8 run's artifact, inside our own folder
    start = time.perf_counter()
    exported = export_bundle(
        task.checkpoint,
        out_dir / BUNDLE_DIR,
        task.capture,
        export_options(options, str(calib) if options.precision == "int8" else None),
        force=True,
    )
    seconds.export = time.perf_counter() - start
    result.bundle = f"{task.name}/{BUNDLE_DIR}"
    validation = exported.bundle.manifest.validation
    if validation is not None:
        judged = validation.vs_fp32 if validation.vs_fp32 is not None else validation
        result.validation_psnr_db = judged.texture_psnr_db
    start = time.perf_counter()
    engine = build_engine(
        exported.bundle, options.build.backend, build_options(options, task.latents)
    )
    seconds.build = time.perf_counter() - start
    result.backend = engine.backend
    result.engine = f"{result.bundle}/{engine.path}"
    check = getattr(engine, "check", None)
    result.engine_psnr_db = None if check is None else check.texture_psnr_db


def process_identity(task: IdentityTask) -> IdentityResult:
    """Build one identity, or skip it when ``OUT/<name>`` already holds it built from the same
    inputs. Never raises for the identity's own failure (see the module docstring)."""
    out_dir = Path(task.out_dir)
    result = IdentityResult(task.name, "running", task.options.precision)
    owned = False
    try:
        start = time.perf_counter()
        digests = input_digests(task)
        result.inputs, result.inputs_sha256 = digests, digests.sha256()
        result.seconds.hash = time.perf_counter() - start
        existing = read_record(out_dir)
        owned = True
        if (
            existing is not None
            and existing.status == "built"
            and existing.inputs_sha256 == result.inputs_sha256
            and _intact(out_dir, existing)
        ):
            return replace(existing, status="skipped", seconds=result.seconds)
        write_record(out_dir, result)
        _set_threads(task.threads)
        _run_phases(task, result)
        result.status = "built"
    except Exception as exc:  # noqa: BLE001 - one identity's failure is data, not a crash
        result.status = "failed"
        result.error, result.traceback = _error_line(exc)
    if owned:
        try:
            write_record(out_dir, result)
        except OSError as exc:
            result.status = "failed"
            result.error = f"cannot write {out_dir / RECORD_FILE}: {exc}"
    return result


def failed_result(task: IdentityTask, error: str) -> IdentityResult:
    """The result of an identity whose task never returned (its worker died)."""
    return IdentityResult(task.name, "failed", task.options.precision, error=error)
