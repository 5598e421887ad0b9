"""The embedded synthetic avatar: a Multiface-layout capture plus a DAM trained on it.

No real capture can be downloaded everywhere avatarq runs, so the demo, the tests and the
benchmarks use this one. The result is cached: a directory whose ``synth.json`` records the
settings it was made with is reused when asked for the same settings again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from avatarq.core.files import StagedDirectory, atomic_write_text
from avatarq.core.progress import Progress, or_silent
from avatarq.data.capture import MultifaceCapture
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.data.train import TrainConfig, TrainReport, train_dam
from avatarq.errors import AvatarqError
from avatarq.models.checkpoint import save_checkpoint

RECORD_FILE = "synth.json"
CHECKPOINT_FILE = "dam.pt"
CAPTURE_DIR = "capture"


@dataclass(frozen=True)
class SyntheticAvatar:
    """Paths of a made synthetic avatar.

    Attributes:
        root: the output directory.
        capture_root: the Multiface-layout capture (identity folder).
        checkpoint: the trained DAM, a Multiface-format state_dict (``module.`` keys).
        reused: True when an existing cached avatar was returned unchanged.
    """

    root: Path
    capture_root: Path
    checkpoint: Path
    reused: bool
    record: dict


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
    if out.exists() and not out.is_dir():
        raise AvatarqError(f"{out} exists and is not a directory")
    if record_path.is_file() and not force:
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
        if record.get("settings") == settings:
            capture_root = out / record["capture_root"]
            checkpoint = out / CHECKPOINT_FILE
            if capture_root.is_dir() and checkpoint.is_file():
                return SyntheticAvatar(out, capture_root, checkpoint, True, record)
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
        record = {
            "settings": settings,
            "capture_root": str(staged_root.relative_to(stage.path)),
            "training": _report_summary(report),
            "model": asdict(model.config),
        }
        atomic_write_text(
            stage.path / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n"
        )
        stage.commit()
    capture_root = out / record["capture_root"]
    return SyntheticAvatar(out, capture_root, out / CHECKPOINT_FILE, False, record)


def _report_summary(report: TrainReport) -> dict:
    tail = max(1, len(report.losses) // 10)
    return {
        "seconds": round(report.seconds, 1),
        "iterations": len(report.losses),
        "first_loss": report.losses[0] if report.losses else None,
        "final_loss": sum(report.losses[-tail:]) / tail if report.losses else None,
        "final_texture_loss": sum(report.texture_losses[-tail:]) / tail if report.losses else None,
        "final_mesh_loss": sum(report.mesh_losses[-tail:]) / tail if report.losses else None,
    }
