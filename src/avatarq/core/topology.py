"""Mesh topology shared by the capture reader, the bundle and the render stage."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarq.errors import AvatarqError


@dataclass(frozen=True)
class Topology:
    """Triangles and UV atlas of a tracked mesh.

    Attributes:
        vert_ids: int32 [F, 3], vertex indices of each triangle (into vertices [V, 3]).
        uv_ids: int32 [F, 3], texture-coordinate indices of each triangle (into uvs).
        uvs: float32 [Vt, 2], texture coordinates (u, v) in [0, 1]; v = 0 is the bottom
            row of the texture image as stored on disk, i.e. row 0 of a texture tensor
            that was flipped vertically on load (the Multiface convention).
    """

    vert_ids: np.ndarray
    uv_ids: np.ndarray
    uvs: np.ndarray

    def __post_init__(self) -> None:
        for name in ("vert_ids", "uv_ids"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[1] != 3:
                raise AvatarqError(f"topology {name} must be [F, 3], got {list(a.shape)}")
        if self.vert_ids.shape != self.uv_ids.shape:
            raise AvatarqError(
                f"topology vert_ids {list(self.vert_ids.shape)} and uv_ids "
                f"{list(self.uv_ids.shape)} must have the same shape"
            )
        if self.uvs.ndim != 2 or self.uvs.shape[1] != 2:
            raise AvatarqError(f"topology uvs must be [Vt, 2], got {list(self.uvs.shape)}")
        object.__setattr__(self, "vert_ids", np.ascontiguousarray(self.vert_ids, np.int32))
        object.__setattr__(self, "uv_ids", np.ascontiguousarray(self.uv_ids, np.int32))
        object.__setattr__(self, "uvs", np.ascontiguousarray(self.uvs, np.float32))

    @property
    def n_faces(self) -> int:
        return int(self.vert_ids.shape[0])

    @property
    def n_vertices(self) -> int:
        """Number of mesh vertices referenced (max vertex id + 1)."""
        return int(self.vert_ids.max()) + 1 if self.n_faces else 0

    def save(self, path: str | Path) -> None:
        """Write `vert_ids`, `uv_ids`, `uvs` to an .npz file (the bundle's topology.npz)."""
        np.savez(path, vert_ids=self.vert_ids, uv_ids=self.uv_ids, uvs=self.uvs)

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        path = Path(path)
        if not path.is_file():
            raise AvatarqError(f"topology file not found: {path}")
        try:
            with np.load(path) as data:
                return cls(data["vert_ids"], data["uv_ids"], data["uvs"])
        except KeyError as exc:
            raise AvatarqError(
                f"{path} is missing the array {exc} (need vert_ids, uv_ids, uvs)"
            ) from None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise AvatarqError(f"{path} is not a readable topology .npz ({exc})") from None
