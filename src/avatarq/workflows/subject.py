"""The full-size test subject: a synthetic avatar at Multiface size on which methods differ.

`make_test_subject` writes a synthetic capture with fine texture detail
(`SyntheticCaptureConfig(detail="fine")`: pores, skin grain, hair strands, fine wrinkles
that move with the expression), trains a DAM at Multiface size on it (texture 1024, z 256),
and writes a held-out capture of the same face, cameras and skin in new motion (another
motion seed) that neither training nor calibration sees. Everything is cached under
``cache / SUBJECT_PREFIX + key``, the key a hash of the settings: a second call with the
same settings reuses it, and a training that was interrupted resumes from its last saved
state (`avatarq.data.train.train_dam`'s ``state_path``).

`TestSubject.heldout_sequence` is the held-out latent trajectory: the held-out clip's
frames, normalized with the training capture's statistics and encoded by the model's
encoder (z = encoder mean), seen through a training camera with the clip's own head poses;
a `BenchSequence` that `avatarq bench`, the peer study and other benchmarks can play.

The record (``subject.json``) states the training curve, the training loss against the
loss of predicting the mean texture, and the same texture loss on the held-out clip.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.core.progress import Progress, or_silent
from avatarq.data.synthetic_capture import ROOT_NAME, SyntheticCaptureConfig
from avatarq.data.train import TrainConfig, TrainReport
from avatarq.errors import AvatarqError

SUBJECT_PREFIX = "subject_"
RECORD_FILE = "subject.json"
CHECKPOINT_FILE = "dam.pt"
STATE_FILE = "train_state.pt"
TRAIN_DIR = "capture"
HELDOUT_DIR = "heldout"
CURVE_POINTS = 10


def _default_capture() -> SyntheticCaptureConfig:
    return SyntheticCaptureConfig(detail="fine")


def _default_train() -> TrainConfig:
    return TrainConfig(z_dim=256, tex_size=1024, iters=4000, batch=4, threads=2)


@dataclass(frozen=True)
class SubjectConfig:
    """How the test subject is made.

    Attributes:
        capture: the training capture (default: 1024^2 textures with fine detail, 6
            cameras, 2 segments of 32 frames, 2 camera textures per frame).
        train: the DAM training (default: texture 1024, z 256, 4000 steps of batch 4,
            2 threads).
        heldout_motion_seed: motion seed of the held-out capture (same face, cameras and
            skin as ``capture``; new expression and head trajectories).
        heldout_frames: frames of the held-out clip (30 fps).
        heldout_camera_textures: per-camera textures per held-out frame (to measure the
            model's texture loss on frames it never saw).
    """

    capture: SyntheticCaptureConfig = field(default_factory=_default_capture)
    train: TrainConfig = field(default_factory=_default_train)
    heldout_motion_seed: int = 1
    heldout_frames: int = 48
    heldout_camera_textures: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise AvatarqError(f"test subject config version must be 1, got {self.version}")
        if self.heldout_frames < 2:
            raise AvatarqError(f"heldout_frames must be >= 2, got {self.heldout_frames}")
        if self.capture.motion_seed == self.heldout_motion_seed:
            raise AvatarqError(
                f"heldout_motion_seed {self.heldout_motion_seed} is the training capture's "
                "motion seed; the held-out clip must move differently"
            )
        if self.train.tex_size > self.capture.texture_size:
            raise AvatarqError(
                f"train tex_size {self.train.tex_size} exceeds the capture's texture_size "
                f"{self.capture.texture_size}"
            )

    def heldout_capture(self) -> SyntheticCaptureConfig:
        """The held-out capture: ``capture`` with the held-out motion seed and one segment."""
        return replace(
            self.capture,
            motion_seed=self.heldout_motion_seed,
            segment_frames=(self.heldout_frames,),
            camera_textures_per_frame=self.heldout_camera_textures,
        )

    def training_settings(self) -> dict[str, Any]:
        return {"capture": self.capture.to_dict(), "train": self.train.to_dict()}

    def settings(self) -> dict[str, Any]:
        return {
            **self.training_settings(),
            "heldout": self.heldout_capture().to_dict(),
            "version": self.version,
        }

    def key(self) -> str:
        """12 hex digits of the sha256 of the training settings (the cache folder name)."""
        text = json.dumps(self.training_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TestSubject:
    """A made test subject (paths and its record).

    Attributes:
        root: the cache folder.
        capture_root: the training capture (normalization, cameras, calibration samples).
        heldout_root: the held-out capture (never trained on nor calibrated with).
        checkpoint: the trained DAM (Multiface-format state_dict, with its encoder).
        record: ``subject.json`` (settings, training summary and curve, losses).
        reused: True when everything came from the cache.
    """

    root: Path
    capture_root: Path
    heldout_root: Path
    checkpoint: Path
    record: dict[str, Any]
    reused: bool = False

    __test__ = False  # not a pytest test class

    def heldout_sequence(self, camera: str | None = None, max_frames: int | None = None) -> Any:
        """The held-out latent trajectory as a `avatarq.bench.sequences.BenchSequence`."""
        return heldout_sequence(
            self.checkpoint, self.capture_root, self.heldout_root, camera, max_frames
        )


def make_test_subject(
    cache: str | Path,
    config: SubjectConfig | None = None,
    progress: Progress | None = None,
) -> TestSubject:
    """Make (or reuse, or finish) the test subject under ``cache`` (see the module docstring).

    Steps, each skipped when its output is already there: the training capture, the
    held-out capture, the training (resumed from ``train_state.pt`` when one with the same
    settings exists), the evaluation of the record. A finished subject is reused only when
    its record holds the same settings.
    """
    import torch

    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.train import train_dam
    from avatarq.models.checkpoint import load_checkpoint, save_checkpoint

    config = config or SubjectConfig()
    say = or_silent(progress)
    root = Path(cache) / f"{SUBJECT_PREFIX}{config.key()}"
    if root.exists() and not root.is_dir():
        raise AvatarqError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / RECORD_FILE
    checkpoint = root / CHECKPOINT_FILE
    train_root = _capture(root / TRAIN_DIR, config.capture, "training", say)
    heldout_root = _capture(root / HELDOUT_DIR, config.heldout_capture(), "held-out", say)
    if record_path.is_file() and checkpoint.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == config.settings():
            return TestSubject(root, train_root, heldout_root, checkpoint, record, True)

    capture = MultifaceCapture(train_root)
    train = config.train
    if not checkpoint.is_file():
        say(
            f"training a {train.arch} DAM (z {train.z_dim}, texture {train.tex_size}, "
            f"{train.iters} steps of batch {train.batch}); progress is saved to {STATE_FILE}"
        )
        model, report = train_dam(capture, train, say, state_path=root / STATE_FILE)
        save_checkpoint(model, checkpoint)
    else:
        model = load_checkpoint(checkpoint)
        report = _saved_report(root / STATE_FILE, train)
    say("measuring the texture loss on the held-out clip")
    with torch.no_grad():
        heldout = heldout_texture_loss(model.eval(), capture, MultifaceCapture(heldout_root))
    record = {
        "settings": config.settings(),
        "key": config.key(),
        "capture_root": str(train_root.relative_to(root)),
        "heldout_root": str(heldout_root.relative_to(root)),
        "model": asdict(model.config),
        "training": training_summary(report),
        "heldout": heldout,
    }
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return TestSubject(root, train_root, heldout_root, checkpoint, record, False)


def training_status(cache: str | Path, config: SubjectConfig | None = None) -> dict[str, Any]:
    """Where the subject's training stands, without training: the `training_summary` of the
    last saved state (``steps`` done of ``iters``), or of the finished record.

    Raises:
        AvatarqError: nothing was saved yet for these settings.
    """
    config = config or SubjectConfig()
    root = Path(cache) / f"{SUBJECT_PREFIX}{config.key()}"
    record_path = root / RECORD_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == config.settings():
            return {"finished": True, "iters": config.train.iters, **record["training"]}
    report = _saved_report(root / STATE_FILE, config.train)
    if not report.losses:
        raise AvatarqError(f"no saved training state for these settings under {root}")
    return {"finished": False, "iters": config.train.iters, **training_summary(report)}


def _capture(out: Path, config: SyntheticCaptureConfig, what: str, say: Progress) -> Path:
    """The capture root under ``out`` made with ``config`` (written when missing)."""
    from avatarq.data.synthetic_capture import write_synthetic_capture

    capture_root = out / ROOT_NAME
    truth = capture_root / "synthetic.json"
    if truth.is_file():
        if json.loads(truth.read_text()).get("config") == config.to_dict():
            return capture_root
        raise AvatarqError(
            f"{capture_root} was written with other settings; remove {out} to rebuild it"
        )
    say(f"writing the {what} capture ({sum(config.segment_frames)} frames)")
    return write_synthetic_capture(out, config)


def _saved_report(path: Path, config: TrainConfig) -> TrainReport:
    """The training report kept in the saved training state (an empty one when absent)."""
    import torch

    if not path.is_file():
        return TrainReport()
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("config") != config.to_dict():
        return TrainReport()
    return TrainReport(**state["report"])


def training_summary(report: TrainReport, points: int = CURVE_POINTS) -> dict[str, Any]:
    """Training losses summarized: the curve as ``points`` windowed means, the final loss
    (mean of the last tenth of the steps) and the mean-texture loss it compares with.

    Returns a JSON-ready dict; ``texture_loss_ratio`` = final texture loss / mean-texture
    loss (1 = no better than ignoring the latent code; lower is better).
    """
    n = len(report.texture_losses)
    tail = max(1, n // 10)
    tex = np.asarray(report.texture_losses, dtype=np.float64)
    final = float(tex[-tail:].mean()) if n else math.nan
    curve = []
    if n:
        edges = np.linspace(0, n, min(points, n) + 1).round().astype(int)
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            curve.append({"steps": [int(a) + 1, int(b)], "texture_loss": float(tex[a:b].mean())})
    base = report.mean_texture_loss
    return {
        "steps": n,
        "seconds": round(report.seconds, 1),
        "first_texture_loss": float(tex[0]) if n else None,
        "final_texture_loss": final if n else None,
        "final_loss": float(np.mean(report.losses[-tail:])) if n else None,
        "final_mesh_loss": float(np.mean(report.mesh_losses[-tail:])) if n else None,
        "mean_texture_loss": base,
        "texture_loss_ratio": final / base if n and base else None,
        "curve": curve,
    }


# --------------------------------------------------------------------------- held-out


def _normalized(train: Any, held: Any, segment: str, frame: str, camera: str) -> np.ndarray:
    """A held-out texture normalized with the training capture's statistics, unseen = 0."""
    tex = held.texture(segment, frame, camera)
    out = (tex - train.tex_mean) / np.float32(train.tex_std)
    out[tex == 0] = 0.0
    return out


def _encode_heldout(model: Any, train: Any, held: Any, frames: list[tuple[str, str]]) -> Any:
    """Encoder means float32 [N, Z] of held-out frames (average textures and meshes
    normalized like the training data)."""
    import torch

    from avatarq.data.capture import AVERAGE
    from avatarq.data.encode import resize_texture

    size = model.config.tex_size
    codes = []
    for start in range(0, len(frames), 8):
        part = frames[start : start + 8]
        tex = torch.from_numpy(np.stack([_normalized(train, held, s, f, AVERAGE) for s, f in part]))
        mesh = np.stack(
            [(held.vertices(s, f).reshape(-1) - train.vert_mean) / train.vert_std for s, f in part]
        )
        mu, _ = model.encode(resize_texture(tex, size), torch.from_numpy(mesh.astype(np.float32)))
        codes.append(mu)
    return torch.cat(codes)


def heldout_texture_loss(model: Any, train: Any, held: Any) -> dict[str, Any]:
    """Texture loss (the training loss's masked MSE, normalized units) of ``model`` on the
    held-out capture's per-camera textures, next to predicting the training capture's mean
    texture (0 in normalized units) and the per-texel mean of the held-out targets."""
    import torch

    from avatarq.data.encode import resize_texture

    size = model.config.tex_size
    cams = list(train.cameras)
    segment, frame_ids = next(held.clips())
    frames = [(segment, f) for f in frame_ids]
    z = _encode_heldout(model, train, held, frames)
    err = zero = count = 0.0
    targets = []
    for i, (s, f) in enumerate(frames):
        for ci, cam in enumerate(cams):
            if not held.has_texture(s, f, cam):
                continue
            raw = held.texture(s, f, cam)
            target = resize_texture(
                torch.from_numpy(_normalized(train, held, s, f, cam))[None], size
            )
            seen = (raw.sum(0, keepdims=True) > 0).astype(np.float32)
            mask = (resize_texture(torch.from_numpy(seen)[None], size) > 0.99).float()
            view = torch.from_numpy(held.view_direction(s, f, cam))[None]
            tex, _ = model.decode(z[i : i + 1], view, torch.tensor([ci]))
            err += float((((tex - target) ** 2) * mask).double().sum())
            zero += float(((target**2) * mask).double().sum())
            count += float(mask.sum()) * 3
            targets.append((target, mask))
    if not count:
        raise AvatarqError(f"held-out capture {held.root} has no per-camera textures")
    total = sum(t * m for t, m in targets)
    seen_n = sum(m for _, m in targets)
    mean = total / seen_n.clamp(min=1)
    spread = sum(float((((t - mean) ** 2) * m).double().sum()) for t, m in targets)
    return {
        "frames": len(frames),
        "samples": len(targets),
        "texture_loss": err / count,
        "training_mean_texture_loss": zero / count,
        "heldout_mean_texture_loss": spread / count,
    }


def heldout_sequence(
    checkpoint: str | Path,
    capture_root: str | Path,
    heldout_root: str | Path,
    camera: str | None = None,
    max_frames: int | None = None,
) -> Any:
    """The held-out clip as a `BenchSequence` of ``checkpoint``'s encoder means.

    Args:
        checkpoint: the trained DAM (with its encoder).
        capture_root: the training capture: normalization, cameras; becomes the
            sequence's capture (it de-normalizes the decoder's outputs).
        heldout_root: the held-out capture (same cameras, new motion).
        camera: KRT camera name (None: the most frontal camera).
        max_frames: keep only the first frames (None: all).

    Returns:
        BenchSequence: z [T, Z] float32, view [T, 3] and M [T, 3, 4] of ``camera`` at the
        held-out head poses, ids ("heldout:<segment>", frame, camera).
    """
    import torch

    from avatarq.bench.sequences import default_camera, posed_sequence
    from avatarq.data.capture import MultifaceCapture
    from avatarq.models.checkpoint import load_checkpoint

    train = MultifaceCapture(capture_root)
    held = MultifaceCapture(heldout_root)
    if train.cameras.keys() != held.cameras.keys() or any(
        not np.allclose(train.camera(c).K, held.camera(c).K)
        or not np.allclose(train.camera(c).R, held.camera(c).R)
        for c in train.cameras
    ):
        raise AvatarqError(f"{heldout_root} and {capture_root} do not share their cameras")
    cam = camera or default_camera(train)
    train.camera(cam)
    segment, frame_ids = next(held.clips())
    if max_frames is not None:
        frame_ids = frame_ids[:max_frames]
    if len(frame_ids) < 2:
        raise AvatarqError(f"the held-out clip needs at least 2 frames, got {len(frame_ids)}")
    model = load_checkpoint(checkpoint)
    frames = [(segment, f) for f in frame_ids]
    with torch.no_grad():
        z = _encode_heldout(model.eval(), train, held, frames).numpy()
    source = (
        f"held-out clip {segment} of {Path(heldout_root).name} ({len(frame_ids)} frames, "
        f"camera {cam}, encoder mean; motion never trained on nor calibrated with)"
    )
    label = f"heldout:{segment}"
    return posed_sequence(held, segment, frame_ids, cam, z, source, label, rendering=train)
