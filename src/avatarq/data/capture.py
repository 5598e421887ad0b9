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
from avatarq.errors import AvatarqError

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
class Camera:
    """One calibrated camera of a capture rig.

    Attributes:
        name: camera id as written in the KRT (e.g. "400002").
        K: float64 [3, 3] intrinsics in pixels.
        distortion: float64 [D] lens distortion coefficients (unused by Multiface).
        R: float64 [3, 3] rotation, world -> camera.
        t: float64 [3] translation, world -> camera (x_cam = R x_world + t).
        width, height: image size in pixels when known (the KRT does not store it).
    """

    name: str
    K: np.ndarray
    distortion: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        for attr, shape in (("K", (3, 3)), ("R", (3, 3)), ("t", (3,))):
            a = np.asarray(getattr(self, attr), dtype=np.float64)
            if a.shape != shape:
                raise AvatarqError(
                    f"camera {self.name!r}: {attr} must have shape {list(shape)}, "
                    f"got {list(a.shape)}"
                )
            object.__setattr__(self, attr, a)
        object.__setattr__(
            self, "distortion", np.asarray(self.distortion, dtype=np.float64).reshape(-1)
        )

    @property
    def center(self) -> np.ndarray:
        """float64 [3], camera centre in world coordinates: c = -R^T t."""
        return -self.R.T @ self.t

    @property
    def extrinsics(self) -> np.ndarray:
        """float64 [3, 4], [R | t] (world -> camera)."""
        return np.concatenate([self.R, self.t[:, None]], axis=1)


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


def _floats(line: str, n: int, path: Path, lineno: int) -> list[float]:
    parts = line.split()
    if n and len(parts) != n:
        raise AvatarqError(
            f"{path}:{lineno}: expected {n} numbers, got {len(parts)} ({line.strip()!r}); "
            "a KRT block is: name, 3 lines K, 1 line distortion, 3 lines [R|t], blank"
        )
    try:
        return [float(x) for x in parts]
    except ValueError:
        raise AvatarqError(f"{path}:{lineno}: not a number in {line.strip()!r}") from None


def read_krt(path: str | Path) -> dict[str, Camera]:
    """Read a Multiface KRT calibration file.

    Each block is: the camera name; 3 lines of K (3 numbers each); 1 line of distortion
    coefficients; 3 lines of [R | t] (4 numbers each, world -> camera); a blank line.
    Trailing whitespace, extra blank lines between blocks and a missing final blank line
    are tolerated.

    Returns:
        cameras by name, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise AvatarqError(f"KRT calibration file not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise AvatarqError(f"{path} is not a text KRT calibration file") from None
    cameras: dict[str, Camera] = {}
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        name = lines[i].strip()
        if i + 8 > len(lines):
            raise AvatarqError(
                f"{path}:{i + 1}: camera {name!r} block is truncated "
                "(need name, 3 lines K, 1 line distortion, 3 lines [R|t])"
            )
        K = [_floats(lines[i + 1 + r], 3, path, i + 2 + r) for r in range(3)]
        dist = _floats(lines[i + 4], 0, path, i + 5)
        Rt = np.array([_floats(lines[i + 5 + r], 4, path, i + 6 + r) for r in range(3)])
        if name in cameras:
            raise AvatarqError(f"{path}:{i + 1}: camera {name!r} appears twice")
        cameras[name] = Camera(name, np.array(K), np.array(dist), Rt[:, :3], Rt[:, 3])
        i += 8
    if not cameras:
        raise AvatarqError(f"{path} holds no camera blocks")
    return cameras


def write_krt(path: str | Path, cameras: dict[str, Camera] | list[Camera]) -> None:
    """Write cameras in the KRT format that `read_krt` (and Multiface) reads."""
    cams = list(cameras.values()) if isinstance(cameras, dict) else list(cameras)
    out = []
    for cam in cams:
        out.append(cam.name)
        out += [" ".join(f"{x:.10g}" for x in row) for row in cam.K]
        out.append(" ".join(f"{x:.10g}" for x in cam.distortion))
        out += [" ".join(f"{x:.10g}" for x in row) for row in cam.extrinsics]
        out.append("")
    Path(path).write_text("\n".join(out) + "\n")


def read_obj_topology(path: str | Path) -> tuple[Topology, np.ndarray]:
    """Parse a tracked-mesh OBJ: ``v x y z``, ``vt u v``, ``f v/t v/t v/t`` (1-based).

    Returns:
        (topology, vertices float32 [V, 3]). Only triangles are accepted; ``f v/t/n``
        normals indices are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise AvatarqError(f"mesh OBJ not found: {path}")
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    faces: list[list[int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "vt":
                uvs.append([float(x) for x in parts[1:3]])
            elif parts[0] == "f":
                if len(parts) != 4:
                    raise AvatarqError(
                        f"{path}:{lineno}: only triangles are supported, got a face with "
                        f"{len(parts) - 1} corners"
                    )
                corner = [p.split("/") for p in parts[1:]]
                if any(len(c) < 2 or not c[1] for c in corner):
                    raise AvatarqError(
                        f"{path}:{lineno}: faces must be 'f v/t v/t v/t' (UV indices needed)"
                    )
                faces.append([int(c[k]) for k in (0, 1) for c in corner])
        except ValueError:
            raise AvatarqError(f"{path}:{lineno}: malformed line {line.strip()!r}") from None
    if not faces:
        raise AvatarqError(f"{path} holds no faces")
    f = np.asarray(faces, dtype=np.int64) - 1
    vert_ids, uv_ids = f[:, :3], f[:, 3:]
    v = np.asarray(verts, dtype=np.float32).reshape(-1, 3)
    t = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
    for what, ids, n in (("vertex", vert_ids, len(v)), ("uv", uv_ids, len(t))):
        if ids.min() < 0 or ids.max() >= n:
            raise AvatarqError(
                f"{path}: face {what} indices must lie in 1..{n} (1-based), "
                f"got {ids.min() + 1}..{ids.max() + 1}"
            )
    return Topology(vert_ids, uv_ids, t), v


def _read_scalar(path: Path) -> float:
    try:
        value = float(path.read_text().split()[0])
    except (ValueError, IndexError):
        raise AvatarqError(f"{path} must hold one number") from None
    if not math.isfinite(value) or value <= 0:
        raise AvatarqError(f"{path} must hold a positive variance, got {value}")
    return value


def _read_png(path: Path) -> np.ndarray:
    """float32 [3, H, W] raw 0..255, flipped vertically (row 0 = bottom row on disk)."""
    from PIL import Image

    if not path.is_file():
        raise AvatarqError(f"texture not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except OSError as exc:
        raise AvatarqError(f"{path} is not a readable image ({exc})") from None
    return np.ascontiguousarray(rgb[::-1].transpose(2, 0, 1))


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
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AvatarqError(
                    f"{path}:{lineno}: expected 'SEGMENT FRAMEID', got {line.strip()!r}"
                )
            frames.append((parts[0], parts[1]))
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
        from PIL import Image

        images = self.root / "images"
        for seg, frame in self.frames[:1]:
            for cam in self._cameras:
                path = images / seg / cam / f"{frame}.png"
                if path.is_file():
                    with Image.open(path) as im:
                        return (im.height, im.width)
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
        tex = _read_png(self.root / "tex_mean.png")
        if tex.shape[1] != tex.shape[2]:
            raise AvatarqError(f"tex_mean.png must be square, got {tex.shape[1]}x{tex.shape[2]}")
        return tex

    @property
    def texture_size(self) -> int:
        """T, the side of the (square) UV textures, read from tex_mean.png."""
        from PIL import Image

        with Image.open(self.root / "tex_mean.png") as im:
            if im.width != im.height:
                raise AvatarqError(f"tex_mean.png must be square, got {im.height}x{im.width}")
            return int(im.width)

    @functools.cached_property
    def tex_std(self) -> float:
        """sqrt(tex_var), in 0..255 units."""
        return math.sqrt(_read_scalar(self.root / "tex_var.txt"))

    @functools.cached_property
    def vert_mean(self) -> np.ndarray:
        """float32 [V*3], mean of the head-local vertices (x0, y0, z0, x1, ...)."""
        return np.fromfile(self.root / "vert_mean.bin", dtype=np.float32)

    @functools.cached_property
    def vert_std(self) -> float:
        """sqrt(vert_var), in capture length units."""
        return math.sqrt(_read_scalar(self.root / "vert_var.txt"))

    # ----------------------------------------------------------------- per frame
    def _mesh_path(self, segment: str, frame: str, suffix: str) -> Path:
        return self.root / "tracked_mesh" / segment / f"{frame}{suffix}"

    def texture_path(self, segment: str, frame: str, camera: str = AVERAGE) -> Path:
        return self.root / TEXTURE_DIR / segment / camera / f"{frame}.png"

    def has_texture(self, segment: str, frame: str, camera: str = AVERAGE) -> bool:
        return self.texture_path(segment, frame, camera).is_file()

    def vertices(self, segment: str, frame: str) -> np.ndarray:
        """float32 [V, 3], head-local tracked vertices of one frame (from ``<frame>.bin``)."""
        path = self._mesh_path(segment, frame, ".bin")
        if not path.is_file():
            raise AvatarqError(f"tracked mesh not found: {path}")
        v = np.fromfile(path, dtype=np.float32)
        if v.size == 0 or v.size % 3:
            raise AvatarqError(f"{path} must hold float32 [V, 3], got {v.size} floats")
        return v.reshape(-1, 3)

    def head_pose(self, segment: str, frame: str) -> np.ndarray:
        """float32 [3, 4], [R_f | t_f] mapping head-local -> world (x_w = R_f x_h + t_f).

        The file holds 3 rows of 4 numbers; a 4x4 matrix with last row 0 0 0 1 is accepted.
        """
        path = self._mesh_path(segment, frame, "_transform.txt")
        if not path.is_file():
            raise AvatarqError(f"head pose not found: {path}")
        try:
            pose = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except ValueError:
            raise AvatarqError(f"{path} must hold a 3x4 matrix of numbers") from None
        if pose.shape == (4, 4) and np.allclose(pose[3], [0, 0, 0, 1]):
            pose = pose[:3]
        if pose.shape != (3, 4):
            raise AvatarqError(f"{path} must hold a 3x4 matrix, got {list(pose.shape)}")
        return pose.astype(np.float32)

    def texture(self, segment: str, frame: str, camera: str = AVERAGE) -> np.ndarray:
        """float32 [3, T, T], raw 0..255 texture, flipped vertically (row 0 = uv v 0).

        ``camera`` is a KRT camera name or "average". Texels no camera saw are 0.
        """
        return _read_png(self.texture_path(segment, frame, camera))

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
        return (c_h / np.linalg.norm(c_h)).astype(np.float32)

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
