"""A synthetic avatar capture written in the exact Multiface on-disk layout.

`write_synthetic_capture(out_dir, config)` creates ``out_dir/m--20260101--0000--SYNTH--GHS/``
(`ROOT_NAME`), readable by `avatarq.data.capture.MultifaceCapture` like a real capture:

    frame_list.txt, KRT, tex_mean.png, tex_var.txt, vert_mean.bin, vert_var.txt
    tracked_mesh/<seg>/<frame>.obj|.bin|_transform.txt     (an OBJ for every frame)
    unwrapped_uv_1024/<seg>/average/<frame>.png            (every frame)
    unwrapped_uv_1024/<seg>/<cam>/<frame>.png              (round-robin subset of cameras)
    synthetic.json                                         (config + ground truth; extra)

There is no ``images/`` folder: photographs are optional in the layout and not generated.

The avatar: a closed head mesh (a UV sphere deformed into a skull with brow ridge, eye
sockets, nose, cheekbones, lips, chin and ears; ``(mesh_bands - 1) * mesh_sectors + 2``
vertices, 6050 by default), lengths in millimetres, head-local axes x = the subject's left
(image right for a frontal camera), y = up, z = out of the face. Its UV atlas is a
cylindrical unwrap (u around the head with the seam at the back, v from chin/neck v = 0
up to the crown v = 1), stretched so the face gets more texels; the seam column is
duplicated in ``vt`` and each pole has one ``vt`` per fan triangle, so uv_ids != vert_ids.

Per segment, four expression weights in [0, 1] (`EXPRESSIONS`: jaw_open, smile, blink,
brow_raise) follow smooth trajectories (30 frames per second). They deform the mesh
(jaw rotation, mouth corners, eyelids, brows) and the texture (dark mouth interior and
teeth when the jaw opens, eyelids over the eyes, nasolabial folds, forehead wrinkles).
The head moves a little (a few degrees, a few mm) and is lit by a light fixed in the
world, so shading follows the head pose. Per-camera textures add view-dependent
specular, Fresnel-like darkening, a per-camera colour gain (camera 0 anchored at
identity, as Multiface's colour correction) and zeros on texels facing away from the
camera (unseen, as in real captures).

``.bin`` files hold head-local vertices; ``<frame>_transform.txt`` maps head-local ->
world (x_w = R_f x_h + t_f); the KRT maps world -> camera. Cameras sit on an arc ~1 m in
front of the head, aimed at it, with intrinsics for 2048-high x 1334-wide images.
Textures are computed with row 0 = uv v = 0 and written flipped (PNG row 0 = v = 1), so
the reader's vertical flip recovers the generated orientation. Everything is
deterministic given ``seed``.

Statistics: tex_mean.png is the mean of the average textures; tex_var.txt is the variance
of their values about that mean, pooled over texels, channels and frames (0..255 units);
vert_mean.bin / vert_var.txt likewise over the ``.bin`` vertices (mm). Frame ids are six
digits in steps of 3 (``000100``, ``000103``, ...), as in Multiface frame lists.

Cost of the default config: about 30 s on 2 CPU cores (half of it PNG encoding) and
~130 MB on disk (64 average + 128 per-camera 1024^2 textures, 64 OBJ/bin/transform).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from avatarq.core.files import StagedDirectory
from avatarq.data.capture import AVERAGE, TEXTURE_DIR, Camera, write_krt
from avatarq.data.synthetic_face import (
    DETAILS,
    Mesh,
    TextureModel,
    build_mesh,
    deform,
    gauss,
    rotation,
)
from avatarq.errors import AvatarqError

ROOT_NAME = "m--20260101--0000--SYNTH--GHS"
EXPRESSIONS = ("jaw_open", "smile", "blink", "brow_raise")
FPS = 30.0
# Segment styles: name and how strongly each expression (EXPRESSIONS order) is used.
_STYLES = (
    ("Jaw_Open_Brow_Raise", (1.0, 0.15, 0.5, 0.9)),
    ("Smile_Blink", (0.15, 1.0, 1.0, 0.1)),
    ("Talking", (0.7, 0.4, 0.6, 0.4)),
    ("Surprise", (0.8, 0.0, 0.2, 1.0)),
)
_HEAD_WORLD = np.array([15.0, -40.0, 30.0])  # head centre in world mm


@dataclass
class SyntheticCaptureConfig:
    """What `write_synthetic_capture` generates.

    Attributes:
        version: config schema version (1).
        seed: everything random (cameras, trajectories, skin detail) derives from it.
        texture_size: T, side of the UV textures (the folder is unwrapped_uv_1024 anyway).
        n_cameras: cameras on the arc in front of the head (names 400002, 400004, ...).
        segment_frames: frames per segment (30 fps); segment names follow _STYLES.
        image_height, image_width: photograph size the intrinsics are made for (pixels).
        mesh_bands: latitude bands pole to pole; mesh_sectors: longitude sectors.
        camera_textures_per_frame: per-camera textures written per frame, cameras taken
            round-robin over frames (0: average textures only; capped at n_cameras: all).
        png_compress_level: zlib level of the written PNGs (1 = fast, 9 = small).
        detail: texture detail, ``standard`` or ``fine`` (adds texel-scale pores, skin
            grain, hair strands and expression-driven fine wrinkles:
            `avatarq.data.synthetic_face.FineDetail`).
        motion_seed: None (motion from ``seed``) or a seed for the expression and head
            trajectories alone: the same face, cameras and skin in new motion (a held-out
            clip of the same avatar).

    ``detail`` and ``motion_seed`` are left out of `to_dict` at their defaults, so that
    configs (and the files written) from before they existed are unchanged.
    """

    version: int = 1
    seed: int = 0
    texture_size: int = 1024
    n_cameras: int = 6
    segment_frames: tuple[int, ...] = (32, 32)
    image_height: int = 2048
    image_width: int = 1334
    mesh_bands: int = 64
    mesh_sectors: int = 96
    camera_textures_per_frame: int = 2
    png_compress_level: int = 1
    detail: str = "standard"
    motion_seed: int | None = None

    def __post_init__(self) -> None:
        self.segment_frames = tuple(int(n) for n in self.segment_frames)
        if self.version != 1:
            raise AvatarqError(f"synthetic capture config version must be 1, got {self.version}")
        lows = {
            "texture_size": 16,
            "n_cameras": 1,
            "image_height": 64,
            "image_width": 64,
            "mesh_bands": 8,
            "mesh_sectors": 8,
        }
        highs = {
            "texture_size": 4096,
            "n_cameras": 1000,
            "image_height": 16384,
            "image_width": 16384,
            "mesh_bands": 2048,
            "mesh_sectors": 2048,
        }
        for name, low in lows.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AvatarqError(f"{name} must be >= {low}, got {value!r}")
            if value > highs[name]:
                raise AvatarqError(f"{name} must be <= {highs[name]}, got {value}")
        if (
            not self.segment_frames
            or min(self.segment_frames) < 1
            or max(self.segment_frames) > 100_000
        ):
            raise AvatarqError(
                f"segment_frames must list at least one segment of 1..100000 frames, "
                f"got {list(self.segment_frames)}"
            )
        if self.camera_textures_per_frame < 0:
            raise AvatarqError(
                f"camera_textures_per_frame must be >= 0, got {self.camera_textures_per_frame}"
            )
        if not 0 <= self.png_compress_level <= 9:
            raise AvatarqError(f"png_compress_level must be 0..9, got {self.png_compress_level}")
        if self.detail not in DETAILS:
            raise AvatarqError(f"detail must be one of {', '.join(DETAILS)}, got {self.detail!r}")
        if self.motion_seed is not None and (
            isinstance(self.motion_seed, bool)
            or not isinstance(self.motion_seed, int)
            or self.motion_seed < 0
        ):
            raise AvatarqError(
                f"motion_seed must be None or an integer >= 0, got {self.motion_seed!r}"
            )

    @property
    def n_vertices(self) -> int:
        return (self.mesh_bands - 1) * self.mesh_sectors + 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segment_frames"] = list(self.segment_frames)
        if self.detail == "standard":
            del d["detail"]
        if self.motion_seed is None:
            del d["motion_seed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticCaptureConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AvatarqError(f"unknown synthetic capture config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SyntheticCaptureConfig:
        return cls.from_dict(json.loads(text))


def segment_names(config: SyntheticCaptureConfig) -> list[str]:
    """Segment names in Multiface style, e.g. ``E001_Jaw_Open_Brow_Raise``."""
    return [
        f"E{s + 1:03d}_{_STYLES[s % len(_STYLES)][0]}" for s in range(len(config.segment_frames))
    ]


# --------------------------------------------------------------------------- rig and motion
def _make_cameras(config: SyntheticCaptureConfig, rng: np.random.Generator):
    """Cameras on an arc ~1 m in front of the head, aimed at it; plus colour gain/bias."""
    n, h, w = config.n_cameras, config.image_height, config.image_width
    azimuths = np.linspace(-50.0, 50.0, n) if n > 1 else np.zeros(1)
    cams, colour = {}, {}
    for i, az in enumerate(np.radians(azimuths)):
        el = math.radians((10.0 if i % 2 == 0 else -6.0) + rng.uniform(-2.0, 2.0))
        dist = 1000.0 + rng.uniform(-40.0, 40.0)
        centre = _HEAD_WORLD + dist * np.array(
            [math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)]
        )
        target = _HEAD_WORLD + rng.uniform(-8.0, 8.0, 3)
        z = (target - centre) / np.linalg.norm(target - centre)
        y = np.array([0.0, -1.0, 0.0])  # image down = world down
        y = (y - (y @ z) * z) / np.linalg.norm(y - (y @ z) * z)
        R = np.stack([np.cross(y, z), y, z])
        f = 2.7 * h * (1.0 + rng.uniform(-0.03, 0.03))
        K = np.array(
            [
                [f, 0.0, w / 2 + rng.uniform(-15.0, 15.0)],
                [0.0, f * (1.0 + rng.uniform(-0.002, 0.002)), h / 2 + rng.uniform(-15.0, 15.0)],
                [0.0, 0.0, 1.0],
            ]
        )
        name = str(400002 + 2 * i)
        cams[name] = Camera(name, K, np.zeros(5), R, -R @ centre, width=w, height=h)
        if i == 0:
            colour[name] = (np.ones(3, np.float32), np.zeros(3, np.float32))
        else:
            colour[name] = (
                (1.0 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32),
                rng.uniform(-4.0, 4.0, 3).astype(np.float32),
            )
    return cams, colour


@dataclass(frozen=True)
class _Segment:
    name: str
    frames: list[str]
    weights: np.ndarray  # float64 [F, 4], EXPRESSIONS order
    poses: np.ndarray  # float64 [F, 3, 4], head-local -> world


def _make_segments(config: SyntheticCaptureConfig, rng: np.random.Generator) -> list[_Segment]:
    segments, start = [], 100
    for s, (name, n) in enumerate(zip(segment_names(config), config.segment_frames, strict=True)):
        emphasis = _STYLES[s % len(_STYLES)][1]
        t = np.arange(n) / FPS
        w = np.zeros((n, len(EXPRESSIONS)))
        for k, amp in enumerate(emphasis):
            if EXPRESSIONS[k] == "blink":
                period, t0 = rng.uniform(1.0, 1.6), rng.uniform(0.15, 0.5)
                events = np.arange(t0, t[-1] + period, period)
                w[:, k] = amp * gauss(t[:, None] - events[None, :], 0.08).max(axis=1)
            else:
                f, phase = rng.uniform(0.45, 0.95), rng.uniform(0, 2 * math.pi)
                w[:, k] = amp * (0.35 + 0.65 * (0.5 - 0.5 * np.cos(2 * math.pi * f * t + phase)))
        f, ph = rng.uniform(0.15, 0.4, 6), rng.uniform(0, 2 * math.pi, 6)
        wave = np.sin(2 * math.pi * f[None, :] * t[:, None] + ph[None, :])  # [n, 6]
        poses = np.zeros((n, 3, 4))
        for i in range(n):
            yaw, pitch, roll = np.radians(
                [4.0 + 6.0 * wave[i, 0], 4.0 * wave[i, 1], 2.5 * wave[i, 2]]
            )
            poses[i, :, :3] = rotation(yaw, pitch, roll)
            poses[i, :, 3] = _HEAD_WORLD + np.array([4.0, 3.0, 5.0]) * wave[i, 3:]
        frames = [f"{start + 3 * i:06d}" for i in range(n)]
        segments.append(_Segment(name, frames, w, poses))
        start += 3 * n + 300
    return segments


# --------------------------------------------------------------------------- writer
def _obj_static(mesh: Mesh) -> str:
    vt = "".join(f"vt {u:.6f} {v:.6f}\n" for u, v in mesh.uvs.tolist())
    f = mesh.vert_ids + 1, mesh.uv_ids + 1
    faces = "".join(
        f"f {a}/{b} {c}/{d} {e}/{g}\n"
        for (a, c, e), (b, d, g) in zip(f[0].tolist(), f[1].tolist(), strict=True)
    )
    return vt + faces


def _write_png(path: Path, tex: np.ndarray, level: int) -> None:
    """Write uint8 [3, T, T] (row 0 = v = 0) flipped, i.e. in on-disk orientation."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    hwc = np.ascontiguousarray(tex.transpose(1, 2, 0)[::-1])
    Image.fromarray(hwc).save(path, compress_level=level)


def write_synthetic_capture(
    out_dir: str | Path,
    config: SyntheticCaptureConfig | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic capture into ``out_dir / ROOT_NAME`` and return that root.

    Args:
        out_dir: parent folder (created if needed).
        config: what to generate (default `SyntheticCaptureConfig()`: 6 cameras, 2 x 32
            frames, 1024^2 textures, 6050 vertices).
        overwrite: replace an existing root; otherwise an existing non-empty root is an
            error.

    The capture is written into a staging sibling folder first and renamed at the end, so
    an interrupted run never leaves a half-written root behind.
    """
    config = config or SyntheticCaptureConfig()
    final = Path(out_dir) / ROOT_NAME
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise AvatarqError(f"{final} already exists; remove it or pass overwrite=True")
    with StagedDirectory(final, replace=True) as stage:
        _write_capture(stage.path, config)
        return stage.commit()


def _write_capture(root: Path, config: SyntheticCaptureConfig) -> None:
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    rng_cam, rng_motion, rng_skin, rng_detail = (np.random.default_rng(s) for s in seeds)
    if config.motion_seed is not None:
        rng_motion = np.random.default_rng(
            np.random.SeedSequence([config.seed, config.motion_seed])
        )
    cams, colour = _make_cameras(config, rng_cam)
    segments = _make_segments(config, rng_motion)
    mesh = build_mesh(config.mesh_bands, config.mesh_sectors)
    tex_model = TextureModel(config.texture_size, rng_skin, config.detail, rng_detail)
    obj_tail = _obj_static(mesh)
    cam_names = list(cams)
    level = config.png_compress_level

    write_krt(root / "KRT", cams)
    (root / "frame_list.txt").write_text(
        "".join(f"{seg.name} {f}\n" for seg in segments for f in seg.frames)
    )
    T = config.texture_size
    tex_sum = np.zeros((3, T, T))
    tex_sq = np.zeros((3, T, T))
    verts_all = []
    g = 0
    for seg in segments:
        mesh_dir = root / "tracked_mesh" / seg.name
        mesh_dir.mkdir(parents=True, exist_ok=True)
        uv_dir = root / TEXTURE_DIR / seg.name
        for frame, w, pose in zip(seg.frames, seg.weights, seg.poses, strict=True):
            v = deform(mesh.theta, mesh.phi, mesh.rest, w).astype(np.float32)
            verts_all.append(v.reshape(-1))
            v.tofile(mesh_dir / f"{frame}.bin")
            obj_v = "".join(f"v {x:.5f} {y:.5f} {z:.5f}\n" for x, y, z in v.tolist())
            (mesh_dir / f"{frame}.obj").write_text(obj_v + obj_tail)
            np.savetxt(mesh_dir / f"{frame}_transform.txt", pose, fmt="%.9f")

            albedo, ks = tex_model.expression(w)
            avg = tex_model.average(albedo, pose)
            _write_png(uv_dir / AVERAGE / f"{frame}.png", avg, level)
            a64 = avg.astype(np.float64)
            tex_sum += a64
            tex_sq += a64 * a64
            k = min(config.camera_textures_per_frame, len(cam_names))
            for j in range(k):
                name = cam_names[(g * k + j) % len(cam_names)]
                tex = tex_model.view(albedo, ks, pose, cams[name], *colour[name])
                _write_png(uv_dir / name / f"{frame}.png", tex, level)
            g += 1

    n = float(g)
    tex_mean = tex_sum / n
    _write_png(root / "tex_mean.png", np.rint(tex_mean).astype(np.uint8), level)
    tex_var = float(np.mean(tex_sq / n - tex_mean**2))
    verts = np.stack(verts_all).astype(np.float64)
    vert_mean = verts.mean(axis=0)
    vert_var = float(np.mean((verts - vert_mean) ** 2))
    vert_mean.astype(np.float32).tofile(root / "vert_mean.bin")
    (root / "tex_var.txt").write_text(f"{max(tex_var, 1e-6):.6f}\n")
    (root / "vert_var.txt").write_text(f"{max(vert_var, 1e-9):.9f}\n")

    truth = {
        "generator": "avatarq.data.synthetic_capture",
        "config": config.to_dict(),
        "n_vertices": int(mesh.rest.shape[0]),
        "units": "millimetres; .bin head-local; transform head-local -> world",
        "expressions": list(EXPRESSIONS),
        "segments": [
            {
                "name": seg.name,
                "frames": seg.frames,
                "weights": np.round(seg.weights, 6).tolist(),
            }
            for seg in segments
        ],
    }
    (root / "synthetic.json").write_text(json.dumps(truth, indent=1) + "\n")
