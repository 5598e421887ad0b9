"""Latent-sequence files: an ordered sequence of decoder inputs (z, view) in one .npz.

A latent sequence drives a decoder without a capture: calibration samples, benchmark
sequences and jitter tests all read it. Keys of the .npz:

    z        float32 [T, Z]   latent codes, in temporal order
    view     float32 [T, 3]   unit view directions in head coordinates
    camera   str [T]          optional, camera name per step
    frame    str [T]          optional, frame id per step
    segment  str [T]          optional, segment name per step
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarq.errors import AvatarqError

_LABELS = ("camera", "frame", "segment")


@dataclass(frozen=True, eq=False)
class LatentSequence:
    """T decoder inputs in temporal order.

    Attributes:
        z: float32 [T, Z] latent codes.
        view: float32 [T, 3] view directions (head coordinates).
        camera, frame, segment: optional str arrays [T] naming where each step came from.
    """

    z: np.ndarray
    view: np.ndarray
    camera: np.ndarray | None = None
    frame: np.ndarray | None = None
    segment: np.ndarray | None = None

    def __post_init__(self) -> None:
        z = np.asarray(self.z)
        view = np.asarray(self.view)
        if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
            raise AvatarqError(f"latent z must be [T, Z] with T, Z > 0, got {list(z.shape)}")
        t = z.shape[0]
        if view.shape != (t, 3):
            raise AvatarqError(f"latent view must be [T, 3] = [{t}, 3], got {list(view.shape)}")
        for name, a in (("z", z), ("view", view)):
            if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise AvatarqError(f"latent {name} must be real numbers, got dtype {a.dtype}")
            if not np.isfinite(a).all():
                raise AvatarqError(f"latent {name} holds NaN or infinite values")
        object.__setattr__(self, "z", np.ascontiguousarray(z, dtype=np.float32))
        object.__setattr__(self, "view", np.ascontiguousarray(view, dtype=np.float32))
        for name in _LABELS:
            a = getattr(self, name)
            if a is None:
                continue
            a = np.asarray(a)
            if a.shape != (t,):
                raise AvatarqError(f"latent {name} must be [T] = [{t}], got {list(a.shape)}")
            object.__setattr__(self, name, a.astype(str))

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def z_dim(self) -> int:
        return int(self.z.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write the .npz (uncompressed; numpy appends .npz when missing). Returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {"z": self.z, "view": self.view}
        arrays.update({n: getattr(self, n) for n in _LABELS if getattr(self, n) is not None})
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatentSequence:
        """Read a .npz written by `save` (or by hand with the same keys)."""
        path = Path(path)
        if not path.is_file():
            raise AvatarqError(f"latent-sequence file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.ndarray):
                raise AvatarqError(f"{path} is a single .npy array, not a latent-sequence .npz")
            with data:
                missing = [k for k in ("z", "view") if k not in data.files]
                if missing:
                    raise AvatarqError(
                        f"{path} is missing {', '.join(missing)} (a latent sequence holds "
                        "z [T, Z] and view [T, 3], optionally camera, frame, segment [T])"
                    )
                arrays = {k: data[k] for k in ("z", "view", *_LABELS) if k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise AvatarqError(f"{path} is not a readable latent-sequence .npz ({exc})") from None
        try:
            return cls(**arrays)
        except AvatarqError as exc:
            raise AvatarqError(f"{path}: {exc}") from None
