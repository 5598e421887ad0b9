"""The embedded synthetic avatar: a Multiface-layout capture plus a DAM trained on it.

No real capture can be downloaded everywhere avatarq runs, so the demo, the tests and the
benchmarks use this one. The result is cached: a directory whose ``synth.json`` records the
settings it was made with is reused when asked for the same settings again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avatarq.core.documents import DOCUMENT_CONFIG, load_document
from avatarq.core.files import StagedDirectory, atomic_write_text, check_parent, inside
from avatarq.core.progress import Progress, or_silent
from avatarq.data.capture import MultifaceCapture
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.data.train import TrainConfig, TrainReport, train_dam
from avatarq.errors import AvatarqError
from avatarq.models.checkpoint import save_checkpoint

RECORD_FILE = "synth.json"
CHECKPOINT_FILE = "dam.pt"
CAPTURE_DIR = "capture"


@dataclass
class TrainingSummary:
    """How the synthetic DAM's training went: wall seconds, iterations, the first loss and
    the mean losses over the last tenth of training (None without iterations)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    seconds: float
    iterations: int
    first_loss: float | None
    final_loss: float | None
    final_texture_loss: float | None
    final_mesh_loss: float | None


@dataclass
class SynthRecord:
    """synth.json: the settings an avatar was made with (the cache key), where its capture
    lies (relative to the output), its training and its model config."""

    __pydantic_config__ = DOCUMENT_CONFIG

    settings: dict[str, Any]
    capture_root: str
    training: TrainingSummary
    model: dict[str, Any]


@dataclass(frozen=True)
class SyntheticAvatar:
    """Paths of a made synthetic avatar.

    Attributes:
        root: the output directory.
        capture_root: the Multiface-layout capture (identity folder).
        checkpoint: the trained DAM, a Multiface-format state_dict (``module.`` keys).
        reused: True when an existing cached avatar was returned unchanged.
        record: what synth.json says of it.
    """

    root: Path
    capture_root: Path
    checkpoint: Path
    reused: bool
    record: SynthRecord


def _settings(capture: SyntheticCaptureConfig, train: TrainConfig) -> dict:
    return {"capture": capture.to_dict(), "train": train.to_dict()}


def make_synthetic_avatar(
    out: str | Path,
    capture_config: SyntheticCaptureConfig | None = None,
    train_config: TrainConfig | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> SyntheticAvatar:
    """Write the capture and train the DAM into ``out`` (or reuse a matching cached one).

    Everything is built in a staging folder beside ``out`` and moved into place at the
    end: an interrupted run leaves nothing behind, and an existing ``out`` is replaced
    only when it holds a synthetic avatar avatarq made.
    """
    capture_config = capture_config or SyntheticCaptureConfig()
    train_config = train_config or TrainConfig()
    say = or_silent(progress)
    out = Path(out)
    settings = _settings(capture_config, train_config)
    record_path = out / RECORD_FILE
    size = capture_config.texture_size
    if size & (size - 1):
        raise AvatarqError(f"texture size must be a power of two (Multiface layout), got {size}")
    if train_config.tex_size > size:
        raise AvatarqError(
            f"the model's texture size {train_config.tex_size} exceeds the capture's {size}; "
            "a model cannot learn detail its capture lacks"
        )
    if out.exists() and not out.is_dir():
        raise AvatarqError(f"{out} exists and is not a directory")
    check_parent(out)
    cached = None if force else _cached_record(record_path)
    if cached is not None and cached.settings == settings:
        capture_root = inside(out, cached.capture_root, "synth.json capture")
        checkpoint = out / CHECKPOINT_FILE
        if capture_root.is_dir() and checkpoint.is_file():
            return SyntheticAvatar(out, capture_root, checkpoint, True, cached)
    if out.exists() and any(out.iterdir()) and not record_path.exists():
        raise AvatarqError(
            f"{out} is not empty and holds no synthetic avatar; choose another directory"
        )
    with StagedDirectory(out, replace=out.exists()) as stage:
        say("writing the synthetic capture")
        staged_root = write_synthetic_capture(stage.path / CAPTURE_DIR, capture_config)
        say(
            f"training a {train_config.arch} DAM (z {train_config.z_dim}, texture "
            f"{train_config.tex_size})"
        )
        model, report = train_dam(MultifaceCapture(staged_root), train_config, progress)
        save_checkpoint(model, stage.path / CHECKPOINT_FILE)
        record = SynthRecord(
            settings,
            str(staged_root.relative_to(stage.path)),
            _report_summary(report),
            asdict(model.config),
        )
        text = json.dumps(asdict(record), indent=2, sort_keys=True) + "\n"
        atomic_write_text(stage.path / RECORD_FILE, text)
        stage.commit()
    capture_root = out / record.capture_root
    return SyntheticAvatar(out, capture_root, out / CHECKPOINT_FILE, False, record)


def _cached_record(path: Path) -> SynthRecord | None:
    """The synth.json at ``path``, or None when there is none or it is not one (the avatar
    is then made again)."""
    if not path.is_file():
        return None
    try:
        return load_document(path, SynthRecord)
    except AvatarqError:
        return None


def _report_summary(report: TrainReport) -> TrainingSummary:
    tail = max(1, len(report.losses) // 10)

    def final(losses: list[float]) -> float | None:
        return sum(losses[-tail:]) / tail if report.losses else None

    return TrainingSummary(
        seconds=round(report.seconds, 1),
        iterations=len(report.losses),
        first_loss=report.losses[0] if report.losses else None,
        final_loss=final(report.losses),
        final_texture_loss=final(report.texture_losses),
        final_mesh_loss=final(report.mesh_losses),
    )
