"""Parsers of the files of a Multiface capture: where untrusted bytes become arrays.

Each reader checks what it reads before anything uses it, and turns every problem into an
`AvatarqError` naming the file (and line): a folder or a dangling link where a file belongs,
bytes that are not UTF-8 text, malformed numbers, NaN or infinite values, a camera or head
pose that is not a rigid transform, an image whose header claims more pixels than a capture
holds. File formats are described in `avatarq.data.capture`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarq.core.topology import Topology
from avatarq.errors import AvatarqError

#: Largest image side read from a capture (Multiface: 1024 textures, 2048 x 1334 photos).
MAX_IMAGE_SIDE = 8192
#: How far R^T R of a camera or head pose may be from the identity (rigid transforms).
ROTATION_TOLERANCE = 1e-2
#: Largest coordinate or translation accepted (capture units, millimetres for Multiface).
MAX_COORDINATE = 1e8


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


# --------------------------------------------------------------------------- text and numbers


def check_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (links followed), else AvatarqError naming ``what``."""
    if path.is_file():
        return path
    if path.is_dir():
        raise AvatarqError(f"{what} {path} is a folder; expected a file")
    if path.is_symlink():
        raise AvatarqError(f"{what} {path} is a link to nothing readable")
    raise AvatarqError(f"{what} not found: {path}")


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of the file ``path`` (a binary or unreadable file is an AvatarqError)."""
    data = check_file(path, what).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AvatarqError(
            f"{path} is not a UTF-8 text file (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None


def parse_floats(text: str, path: Path, lineno: int, n: int = 0, at_least: int = 0) -> list[float]:
    """The finite numbers of one line: exactly ``n`` (when given) or at least ``at_least``."""
    parts = text.split()
    if n and len(parts) != n or len(parts) < at_least:
        need = f"{n}" if n else f"at least {at_least}"
        raise AvatarqError(
            f"{path}:{lineno}: expected {need} numbers, got {len(parts)} ({text.strip()[:60]!r})"
        )
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise AvatarqError(f"{path}:{lineno}: not a number in {text.strip()[:60]!r}") from None
    if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in values):
        raise AvatarqError(
            f"{path}:{lineno}: numbers must be finite and at most {MAX_COORDINATE:g} in "
            f"magnitude, got {text.strip()[:60]!r}"
        )
    return values


def check_name(name: str, path: Path, lineno: int, what: str) -> str:
    """A segment, frame or camera id: a plain file name (ids become folder and file names)."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise AvatarqError(
            f"{path}:{lineno}: {what} {name!r} is not a plain name (no '/', '\\', '..')"
        )
    return name


def check_rigid(R: np.ndarray, what: str) -> None:
    """AvatarqError unless ``R`` (float64 [3, 3]) is a rotation within ROTATION_TOLERANCE."""
    error = float(np.abs(R.T @ R - np.eye(3)).max())
    if not error <= ROTATION_TOLERANCE:
        raise AvatarqError(
            f"{what} must be a rotation (R^T R = I within {ROTATION_TOLERANCE}), but R^T R "
            f"is off by {error:.3g}"
        )


def read_scalar(path: Path, what: str) -> float:
    """The one positive finite number in a text file (a variance)."""
    words = read_text(path, what).split()
    try:
        value = float(words[0])
    except (ValueError, IndexError):
        raise AvatarqError(f"{path} must hold one number") from None
    if not math.isfinite(value) or value <= 0:
        raise AvatarqError(f"{path} must hold a positive variance, got {value}")
    return value


def read_float32(path: Path, what: str) -> np.ndarray:
    """float32 [3N] from a raw .bin file of finite x, y, z triples (N >= 1)."""
    values = np.fromfile(check_file(path, what), dtype=np.float32)
    if values.size == 0 or values.size % 3:
        raise AvatarqError(f"{path} must hold float32 [V, 3], got {values.size} floats")
    if not np.isfinite(values).all():
        raise AvatarqError(f"{path} holds NaN or infinite values")
    return values


# --------------------------------------------------------------------------- KRT


def read_krt(path: str | Path) -> dict[str, Camera]:
    """Read a Multiface KRT calibration file.

    Each block is: the camera name; 3 lines of K (3 numbers each); 1 line of distortion
    coefficients; 3 lines of [R | t] (4 numbers each, world -> camera); a blank line.
    Trailing whitespace, extra blank lines between blocks and a missing final blank line
    are tolerated. K must be invertible and R a rotation; every number finite.

    Returns:
        cameras by name, in file order.
    """
    path = Path(path)
    lines = read_text(path, "KRT calibration file").splitlines()
    cameras: dict[str, Camera] = {}
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        name = check_name(lines[i].strip(), path, i + 1, "camera name")
        if i + 8 > len(lines):
            raise AvatarqError(
                f"{path}:{i + 1}: camera {name!r} block is truncated "
                "(need name, 3 lines K, 1 line distortion, 3 lines [R|t])"
            )
        K = np.array([parse_floats(lines[i + 1 + r], path, i + 2 + r, 3) for r in range(3)])
        dist = parse_floats(lines[i + 4], path, i + 5)
        Rt = np.array([parse_floats(lines[i + 5 + r], path, i + 6 + r, 4) for r in range(3)])
        if name in cameras:
            raise AvatarqError(f"{path}:{i + 1}: camera {name!r} appears twice")
        if not abs(np.linalg.det(K)) > 1e-12:
            raise AvatarqError(f"{path}:{i + 2}: camera {name!r} has a singular intrinsics K")
        check_rigid(Rt[:, :3], f"{path}:{i + 6}: the rotation of camera {name!r}")
        cameras[name] = Camera(name, K, np.array(dist), Rt[:, :3], Rt[:, 3])
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


# --------------------------------------------------------------------------- head pose, mesh


def read_head_pose(path: Path) -> np.ndarray:
    """float64 [3, 4], a rigid [R_f | t_f] from 3 rows of 4 numbers (a 4 x 4 matrix with last
    row 0 0 0 1 is accepted)."""
    rows = [
        parse_floats(line, path, k, 4)
        for k, line in enumerate(read_text(path, "head pose").splitlines(), 1)
        if line.strip()
    ]
    if len(rows) == 4 and np.allclose(rows[3], [0, 0, 0, 1]):
        rows = rows[:3]
    if len(rows) != 3:
        raise AvatarqError(f"{path} must hold a 3x4 matrix, got {len(rows)} rows of 4 numbers")
    pose = np.array(rows, dtype=np.float64)
    check_rigid(pose[:, :3], f"{path}: the head pose")
    return pose


def read_obj_topology(path: str | Path) -> tuple[Topology, np.ndarray]:
    """Parse a tracked-mesh OBJ: ``v x y z``, ``vt u v``, ``f v/t v/t v/t`` (1-based).

    Returns:
        (topology, vertices float32 [V, 3]). Only triangles are accepted; ``f v/t/n``
        normals indices are ignored; every index must name a listed vertex or uv.
    """
    path = Path(path)
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    faces: list[list[int]] = []
    for lineno, line in enumerate(read_text(path, "mesh OBJ").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append(parse_floats(" ".join(parts[1:]), path, lineno, at_least=3)[:3])
        elif parts[0] == "vt":
            uvs.append(parse_floats(" ".join(parts[1:]), path, lineno, at_least=2)[:2])
        elif parts[0] == "f":
            faces.append(_face(parts, path, lineno))
    if not faces:
        raise AvatarqError(f"{path} holds no faces")
    for what, column, n in (("vertex", 0, len(verts)), ("uv", 1, len(uvs))):
        ids = [c[column] for face in faces for c in face]
        if min(ids) < 1 or max(ids) > n:
            raise AvatarqError(
                f"{path}: face {what} indices must lie in 1..{n} (1-based), "
                f"got {min(ids)}..{max(ids)}"
            )
    f = np.asarray([[c[k] for k in (0, 1) for c in face] for face in faces], np.int64) - 1
    v = np.asarray(verts, dtype=np.float32).reshape(-1, 3)
    t = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
    return Topology(f[:, :3], f[:, 3:], t), v


def _face(parts: list[str], path: Path, lineno: int) -> list[tuple[int, int]]:
    if len(parts) != 4:
        raise AvatarqError(
            f"{path}:{lineno}: only triangles are supported, got a face with "
            f"{len(parts) - 1} corners"
        )
    corners = [p.split("/") for p in parts[1:]]
    if any(len(c) < 2 or not c[1] for c in corners):
        raise AvatarqError(f"{path}:{lineno}: faces must be 'f v/t v/t v/t' (UV indices needed)")
    try:
        return [(int(c[0]), int(c[1])) for c in corners]
    except ValueError:
        raise AvatarqError(f"{path}:{lineno}: malformed face {' '.join(parts)[:60]!r}") from None


# --------------------------------------------------------------------------- images


def _open_image(path: Path, what: str):  # -> PIL.Image.Image
    """The opened image (header read, pixels not decoded); a corrupt file or one claiming more
    than MAX_IMAGE_SIDE pixels a side is an AvatarqError."""
    from PIL import Image

    check_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as exc:
        reason = str(exc).split(",")[0].strip() or type(exc).__name__
        raise AvatarqError(f"{path} is not a readable image ({reason[:80]})") from None
    if not (1 <= im.width <= MAX_IMAGE_SIDE and 1 <= im.height <= MAX_IMAGE_SIDE):
        im.close()
        raise AvatarqError(
            f"{path} claims {im.width}x{im.height} pixels; a capture image is at most "
            f"{MAX_IMAGE_SIDE} pixels a side"
        )
    return im


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(height, width) of an image, from its header."""
    with _open_image(path, what) as im:
        return int(im.height), int(im.width)


def read_png(path: Path, what: str = "texture") -> np.ndarray:
    """float32 [3, H, W] raw 0..255, flipped vertically (row 0 = bottom row on disk)."""
    try:
        with _open_image(path, what) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).split(",")[0].strip() or type(exc).__name__
        raise AvatarqError(f"{path} is not a readable image ({reason[:80]})") from None
    return np.ascontiguousarray(rgb[::-1].transpose(2, 0, 1))
