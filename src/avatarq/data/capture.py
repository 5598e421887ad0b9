"""Reader for captures in the Multiface on-disk layout (one identity root).

Layout of a root such as ``m--20180227--0000--6795937--GHS/`` (facebookresearch/multiface)::

    frame_list.txt                      lines "SEGMENT FRAMEID"
    KRT                                 camera calibration blocks (see `read_krt`)
    tex_mean.png  tex_var.txt           texture mean image (RGB) and scalar variance
    vert_mean.bin vert_var.txt          float32 [V*3] vertex mean and scalar variance
    tracked_mesh/<seg>/<frame>.obj      topology + UVs (and that frame's vertices)
    tracked_mesh/<seg>/<frame>.bin      float32 [V, 3], head-local vertices
    tracked_mesh/<seg>/<frame>_transform.txt   3x4 head pose [R_f | t_f], head -> world
    unwrapped_uv_1024/<seg>/<cam>/<frame>.png  per-camera texture (0 = unseen texel)
    unwrapped_uv_1024/<seg>/average/<frame>.png
    images/<seg>/<cam>/<frame>.png      optional photographs (2048 high x 1334 wide)

Conventions (all as in Multiface):
- KRT extrinsics [R_C | t_C] map world -> camera (OpenCV camera: x right, y down, z forward).
- ``.bin`` vertices are head-local; the frame transform maps head-local -> world, so the
  pixel projection of head-local vertices is M = K [R_C R_f | R_C t_f + t_C].
- Textures are flipped vertically on load (``[::-1]``): row 0 of a loaded texture is the
  bottom row of the PNG, i.e. uv v = 0. The texture folder is named ``unwrapped_uv_1024``
  whatever the texture size inside.
- Lengths are in the units of the capture (millimetres for Multiface); textures are raw
  0..255 values as float32.

Nothing is loaded eagerly except the frame list and the KRT: textures and meshes are read
one file per call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from avatarq.core.topology import Topology
from avatarq.data.capture_files import (
    Camera,
    check_name,
    image_size,
    read_float32,
    read_head_pose,
    read_krt,
    read_obj_topology,
    read_png,
    read_scalar,
    read_text,
    write_krt,
)
from avatarq.errors import AvatarqError

__all__ = [
    "AVERAGE",
    "Camera",
    "MultifaceCapture",
    "Sample",
    "read_krt",
    "read_obj_topology",
    "resolve_capture_root",
    "write_krt",
]

TEXTURE_DIR = "unwrapped_uv_1024"
AVERAGE = "average"
DEFAULT_IMAGE_SIZE = (2048, 1334)  # (height, width) of Multiface v1 photographs
REQUIRED_FILES = (
    "frame_list.txt",
    "KRT",
    "tex_mean.png",
    "tex_var.txt",
    "vert_mean.bin",
    "vert_var.txt",
    "tracked_mesh",
    TEXTURE_DIR,
)


@dataclass(frozen=True, eq=False)
class Sample:
    """What a decoder needs to be evaluated for one (frame, camera).

    Attributes:
        segment, frame, camera: identifiers as in frame_list.txt and the KRT.
        view: float32 [3], unit view direction (camera centre in head coordinates).
        M: float32 [3, 4], projection of head-local vertices to pixels (divide by row 3).
    """

    segment: str
    frame: str
    camera: str
    view: np.ndarray
    M: np.ndarray


def resolve_capture_root(path: str | Path) -> Path:
    """The capture root ``path`` names: the identity folder itself (holding frame_list.txt),
    or a folder holding exactly one such identity folder (as `avatarq synth` writes
    OUT/capture/<identity>/)."""
    root = Path(path)
    if not root.exists():
        raise AvatarqError(f"capture root not found: {root}")
    if not root.is_dir():
        raise AvatarqError(f"capture root {root} is not a folder")
    if (root / "frame_list.txt").exists():
        return root
    identities = sorted(
        p for p in root.iterdir() if p.is_dir() and (p / "frame_list.txt").is_file()
    )
    if len(identities) == 1:
        return identities[0]
    if len(identities) > 1:
        names = ", ".join(p.name for p in identities[:4])
        raise AvatarqError(f"{root} holds {len(identities)} captures ({names}); name one of them")
    return root


class MultifaceCapture:
    """Lazy reader of one Multiface identity capture.

    Args:
        root: the identity folder (holding frame_list.txt, KRT, ...).

    Raises:
        AvatarqError: the root or one of its required files is missing, or the frame list
            or KRT is malformed.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = resolve_capture_root(root)
        for name in REQUIRED_FILES:
            if not (self.root / name).exists():
                raise AvatarqError(
                    f"capture {self.root} is missing {name} (a Multiface capture root holds "
                    f"{', '.join(REQUIRED_FILES)})"
                )
        self.frames: list[tuple[str, str]] = self._read_frame_list()
        self._cameras = read_krt(self.root / "KRT")

    # ----------------------------------------------------------------- metadata
    def _read_frame_list(self) -> list[tuple[str, str]]:
        path = self.root / "frame_list.txt"
        frames = []
        for lineno, line in enumerate(read_text(path, "frame list").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AvatarqError(
                    f"{path}:{lineno}: expected 'SEGMENT FRAMEID', got {line.strip()[:60]!r}"
                )
            segment = check_name(parts[0], path, lineno, "segment")
            frames.append((segment, check_name(parts[1], path, lineno, "frame id")))
        if not frames:
            raise AvatarqError(f"{path} lists no frames")
        return frames

    @property
    def segments(self) -> list[str]:
        """Segment names in order of first appearance in frame_list.txt."""
        return list(dict.fromkeys(seg for seg, _ in self.frames))

    @functools.cached_property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the photographs: read from the first image under images/ when
        present, else Multiface's 2048 x 1334."""
        images = self.root / "images"
        for seg, frame in self.frames[:1]:
            for cam in self._cameras:
                path = images / seg / cam / f"{frame}.png"
                if path.exists() or path.is_symlink():
                    return image_size(path, "photograph")
        return DEFAULT_IMAGE_SIZE

    @property
    def cameras(self) -> dict[str, Camera]:
        """Cameras by name in KRT order, with width/height set from `image_size`."""
        h, w = self.image_size
        return {n: replace(c, width=w, height=h) for n, c in self._cameras.items()}

    def camera(self, name: str) -> Camera:
        if name not in self._cameras:
            raise AvatarqError(
                f"unknown camera {name!r}; the KRT has {', '.join(list(self._cameras)[:8])}"
                + (" ..." if len(self._cameras) > 8 else "")
            )
        return self._cameras[name]

    @functools.cached_property
    def topology(self) -> Topology:
        """Triangles and UVs, parsed from the OBJ of the first listed frame."""
        seg, frame = self.frames[0]
        return read_obj_topology(self.root / "tracked_mesh" / seg / f"{frame}.obj")[0]

    @functools.cached_property
    def tex_mean(self) -> np.ndarray:
        """float32 [3, T, T], mean texture (0..255), flipped like every texture."""
        tex = read_png(self.root / "tex_mean.png", "mean texture")
        if tex.shape[1] != tex.shape[2]:
            raise AvatarqError(f"tex_mean.png must be square, got {tex.shape[1]}x{tex.shape[2]}")
        return tex

    @property
    def texture_size(self) -> int:
        """T, the side of the (square) UV textures, read from tex_mean.png."""
        h, w = image_size(self.root / "tex_mean.png", "mean texture")
        if w != h:
            raise AvatarqError(f"tex_mean.png must be square, got {h}x{w}")
        return w

    @functools.cached_property
    def tex_std(self) -> float:
        """sqrt(tex_var), in 0..255 units."""
        return math.sqrt(read_scalar(self.root / "tex_var.txt", "texture variance"))

    @functools.cached_property
    def vert_mean(self) -> np.ndarray:
        """float32 [V*3], mean of the head-local vertices (x0, y0, z0, x1, ...)."""
        return read_float32(self.root / "vert_mean.bin", "vertex mean")

    @functools.cached_property
    def vert_std(self) -> float:
        """sqrt(vert_var), in capture length units."""
        return math.sqrt(read_scalar(self.root / "vert_var.txt", "vertex variance"))

    # ----------------------------------------------------------------- per frame
    def _mesh_path(self, segment: str, frame: str, suffix: str) -> Path:
        return self.root / "tracked_mesh" / segment / f"{frame}{suffix}"

    def texture_path(self, segment: str, frame: str, camera: str = AVERAGE) -> Path:
        return self.root / TEXTURE_DIR / segment / camera / f"{frame}.png"

    def has_texture(self, segment: str, frame: str, camera: str = AVERAGE) -> bool:
        return self.texture_path(segment, frame, camera).is_file()

    def vertices(self, segment: str, frame: str) -> np.ndarray:
        """float32 [V, 3], head-local tracked vertices of one frame (from ``<frame>.bin``)."""
        return read_float32(self._mesh_path(segment, frame, ".bin"), "tracked mesh").reshape(-1, 3)

    def head_pose(self, segment: str, frame: str) -> np.ndarray:
        """float32 [3, 4], [R_f | t_f] mapping head-local -> world (x_w = R_f x_h + t_f).

        The file holds 3 rows of 4 numbers; a 4x4 matrix with last row 0 0 0 1 is accepted.
        """
        pose = read_head_pose(self._mesh_path(segment, frame, "_transform.txt"))
        return pose.astype(np.float32)

    def texture(self, segment: str, frame: str, camera: str = AVERAGE) -> np.ndarray:
        """float32 [3, T, T], raw 0..255 texture, flipped vertically (row 0 = uv v 0).

        ``camera`` is a KRT camera name or "average". Texels no camera saw are 0.
        """
        return read_png(self.texture_path(segment, frame, camera))

    def normalized_texture(
        self, segment: str, frame: str, camera: str = AVERAGE, zero_unseen: bool = True
    ) -> np.ndarray:
        """float32 [3, T, T], (texture - tex_mean) / tex_std.

        With ``zero_unseen`` (Multiface's data loader does this), texel channels whose raw
        value is 0 (unseen) are set to 0 instead.
        """
        tex = self.texture(segment, frame, camera)
        if tex.shape != self.tex_mean.shape:
            raise AvatarqError(
                f"texture {self.texture_path(segment, frame, camera)} is "
                f"{list(tex.shape[1:])}, tex_mean.png is {list(self.tex_mean.shape[1:])}"
            )
        out = (tex - self.tex_mean) / np.float32(self.tex_std)
        if zero_unseen:
            out[tex == 0] = 0.0
        return out

    def normalized_vertices(self, segment: str, frame: str) -> np.ndarray:
        """float32 [V*3], (vertices - vert_mean) / vert_std, flattened."""
        v = self.vertices(segment, frame).reshape(-1)
        if v.shape != self.vert_mean.shape:
            raise AvatarqError(
                f"{self._mesh_path(segment, frame, '.bin')} holds {v.size} floats, "
                f"vert_mean.bin holds {self.vert_mean.size}"
            )
        return (v - self.vert_mean) / np.float32(self.vert_std)

    def view_direction(self, segment: str, frame: str, camera: str) -> np.ndarray:
        """float32 [3], unit direction to the camera centre in head coordinates.

        c = -R_C^T t_C (world); c_h = R_f^T (c - t_f); view = c_h / ||c_h||.
        """
        pose = self.head_pose(segment, frame).astype(np.float64)
        c_h = pose[:, :3].T @ (self.camera(camera).center - pose[:, 3])
        norm = float(np.linalg.norm(c_h))
        if not norm > 1e-6:
            raise AvatarqError(
                f"camera {camera} sits at the head's origin in frame {segment}/{frame}; "
                "check the KRT and the frame's _transform.txt"
            )
        return (c_h / norm).astype(np.float32)

    def projection(self, segment: str, frame: str, camera: str) -> np.ndarray:
        """float32 [3, 4], M = K [R_C R_f | R_C t_f + t_C]: head-local points -> pixels.

        p = M [x; 1]; pixel column = p[0] / p[2], row = p[1] / p[2].
        """
        cam = self.camera(camera)
        pose = self.head_pose(segment, frame).astype(np.float64)
        R = cam.R @ pose[:, :3]
        t = cam.R @ pose[:, 3] + cam.t
        return (cam.K @ np.concatenate([R, t[:, None]], axis=1)).astype(np.float32)

    def sample(self, segment: str, frame: str, camera: str) -> Sample:
        return Sample(
            segment,
            frame,
            camera,
            self.view_direction(segment, frame, camera),
            self.projection(segment, frame, camera),
        )

    def clips(
        self, segment: str | None = None, camera: str | None = None
    ) -> Iterator[tuple[str, list[str]]]:
        """Yield (segment, frame ids) per segment, frames in temporal (numeric id) order.

        Args:
            segment: only this segment (default: every segment in frame-list order).
            camera: keep only frames that have a texture for this camera ("average" or a
                KRT name); None keeps every listed frame.
        """
        if segment is not None and segment not in self.segments:
            raise AvatarqError(f"unknown segment {segment!r}; the capture has {self.segments}")
        if camera is not None and camera != AVERAGE:
            self.camera(camera)
        by_segment: dict[str, list[str]] = {}
        for s, f in self.frames:
            by_segment.setdefault(s, []).append(f)
        for seg in [segment] if segment is not None else self.segments:
            ids = by_segment[seg]
            ids.sort(key=lambda f: (int(f), f) if f.isdigit() else (math.inf, f))
            if camera is not None:
                ids = [f for f in ids if self.has_texture(seg, f, camera)]
            yield seg, ids

    def __repr__(self) -> str:
        return (
            f"MultifaceCapture({str(self.root)!r}, {len(self.frames)} frames, "
            f"{len(self.segments)} segments, {len(self._cameras)} cameras)"
        )
