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
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from avatarq.data.capture import AVERAGE, TEXTURE_DIR, Camera, write_krt
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
_EYE_THETA, _EYE_PHI = 0.44, 1.30  # eye centres (|theta|, phi) in radians
_MOUTH_PHI = 2.025  # the line between the lips
_LIGHT_WORLD = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
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
        for name, low in lows.items():
            if int(getattr(self, name)) < low:
                raise AvatarqError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.segment_frames or min(self.segment_frames) < 1:
            raise AvatarqError(
                f"segment_frames must list at least one segment of >= 1 frames, "
                f"got {list(self.segment_frames)}"
            )
        if self.camera_textures_per_frame < 0:
            raise AvatarqError(
                f"camera_textures_per_frame must be >= 0, got {self.camera_textures_per_frame}"
            )
        if not 0 <= self.png_compress_level <= 9:
            raise AvatarqError(f"png_compress_level must be 0..9, got {self.png_compress_level}")

    @property
    def n_vertices(self) -> int:
        return (self.mesh_bands - 1) * self.mesh_sectors + 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segment_frames"] = list(self.segment_frames)
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


# --------------------------------------------------------------------------- helpers
def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * (x / sigma) ** 2)


def _warp(lo: float, hi: float, centre: float, width: float, gain: float):
    """Monotonic map [lo, hi] -> [0, 1] whose density is 1 + gain * gauss(centre, width),
    and its inverse; used to give the face more UV area and more mesh vertices."""
    x = np.linspace(lo, hi, 8193)
    dens = 1.0 + gain * _gauss(x - centre, width)
    s = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    s /= s[-1]
    return (lambda a: np.interp(a, x, s)), (lambda b: np.interp(b, s, x))


_U_OF_THETA, _THETA_OF_U = _warp(-math.pi, math.pi, 0.0, 0.8, 2.5)
_S_OF_PHI, _PHI_OF_S = _warp(0.0, math.pi, 1.65, 0.55, 1.5)


def _theta_of_u(u: np.ndarray) -> np.ndarray:
    """Azimuth (0 = front, +x side positive) of texture coordinate u; seam at the back."""
    return _THETA_OF_U(u)


def _phi_of_v(v: np.ndarray) -> np.ndarray:
    """Polar angle from the crown (0) to the neck (pi) of texture coordinate v."""
    return _PHI_OF_S(1.0 - v)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


# --------------------------------------------------------------------------- geometry
def _relief(th: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """Displacement (mm) of facial features along the skull normal; broadcasts th, ph."""
    a = np.abs(th)
    g = _gauss
    ridge_w = 0.055 + 0.05 * _smoothstep(1.30, 1.74, ph)
    nose = 19.0 * _smoothstep(1.28, 1.74, ph) * (1 - _smoothstep(1.74, 1.86, ph))
    nose = nose * np.exp(-0.5 * (th / ridge_w) ** 2)
    return (
        nose
        + 5.0 * g(a - 0.11, 0.05) * g(ph - 1.78, 0.04)  # nostril wings
        - 7.0 * g(a - _EYE_THETA, 0.16) * g(ph - _EYE_PHI, 0.09)  # eye sockets
        + 3.5 * g(a - _EYE_THETA, 0.08) * g(ph - _EYE_PHI, 0.05)  # eyeballs
        + 4.0 * g(a - 0.38, 0.22) * g(ph - 1.13, 0.05)  # brow ridge
        + 5.0 * g(a - 0.58, 0.18) * g(ph - 1.55, 0.12)  # cheekbones
        + 6.0 * g(th, 0.25) * g(ph - 1.97, 0.045)  # upper lip
        + 5.0 * g(th, 0.22) * g(ph - 2.08, 0.045)  # lower lip
        + 8.0 * g(th, 0.25) * g(ph - 2.38, 0.10)  # chin
        + 14.0 * g(a - 1.62, 0.07) * g(ph - 1.50, 0.16)  # ears
    )


def _rest_surface(th: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """Head-local rest position (mm) [..., 3] of surface point (theta, phi)."""
    st, ct, sp, cp = np.sin(th), np.cos(th), np.sin(ph), np.cos(ph)
    lower = _smoothstep(1.5, 2.6, ph)
    rx = 76.0 * (1.0 - 0.22 * lower)
    ry = 112.0
    rz = 94.0 * (1.0 + 0.05 * (1.0 - ct)) * (1.0 - 0.08 * lower)
    x, y, z = rx * sp * st, ry * cp + 0 * th, rz * sp * ct
    n = np.stack(np.broadcast_arrays(x / rx**2, y / ry**2, z / rz**2), axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1) + _relief(th, ph)[..., None] * n


def _deform(th: np.ndarray, ph: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Apply expression weights w [4] (EXPRESSIONS order) to rest points p [N, 3]."""
    jaw, smile, blink, brow = (float(x) for x in w)
    a, g = np.abs(th), _gauss
    p = p.copy()
    side = np.sign(th)
    # smile: mouth corners up, out and back; cheeks bulge
    corner = smile * g(a - 0.30, 0.09) * g(ph - _MOUTH_PHI, 0.06)
    p += corner[:, None] * np.stack([4.0 * side, 5.5 + 0 * th, -3.0 + 0 * th], axis=1)
    cheek = smile * 3.5 * g(a - 0.5, 0.15) * g(ph - 1.80, 0.09)
    p += cheek[:, None] * p / np.linalg.norm(p, axis=1, keepdims=True)
    # blink: upper lids slide down and bulge a little
    lid = blink * g(a - _EYE_THETA, 0.10) * g(ph - 1.28, 0.04)
    p[:, 1] -= 2.5 * lid
    p += (1.0 * lid)[:, None] * p / np.linalg.norm(p, axis=1, keepdims=True)
    # brow raise
    p[:, 1] += brow * (5.0 * g(a - 0.40, 0.22) * g(ph - 1.12, 0.07) + 1.5 * g(ph - 0.95, 0.15))
    # jaw: rotate everything below the lip line about a hinge axis near the ears
    m = _smoothstep(_MOUTH_PHI - 0.035, _MOUTH_PHI + 0.035, ph)
    m = m * (1 - _smoothstep(0.9, 1.5, a)) * (1 - _smoothstep(2.65, 2.95, ph))
    ang = 0.30 * jaw
    pivot = np.array([0.0, -15.0, -25.0])
    q = p - pivot
    rot = np.stack(
        [
            q[:, 0],
            q[:, 1] * math.cos(ang) - q[:, 2] * math.sin(ang),
            q[:, 1] * math.sin(ang) + q[:, 2] * math.cos(ang),
        ],
        axis=1,
    )
    return p + m[:, None] * (rot + pivot - p)


@dataclass(frozen=True)
class _Mesh:
    theta: np.ndarray  # [V] per-vertex surface coordinates (poles: theta 0)
    phi: np.ndarray  # [V]
    rest: np.ndarray  # [V, 3] rest positions, mm
    vert_ids: np.ndarray  # [F, 3] 0-based
    uv_ids: np.ndarray  # [F, 3] 0-based
    uvs: np.ndarray  # [Vt, 2]


def _build_mesh(bands: int, sectors: int) -> _Mesh:
    """UV-sphere grid: top pole, (bands - 1) rings of `sectors` vertices, bottom pole."""
    rings, L = bands - 1, sectors
    v_ring = 1.0 - np.arange(1, bands) / bands  # ring i: v from near 1 (crown) down
    u_col = np.arange(L + 1) / L  # column L duplicates column 0 in vt (the seam)
    th_col, ph_ring = _theta_of_u(u_col), _phi_of_v(v_ring)
    theta = np.concatenate([[0.0], np.tile(th_col[:L], rings), [0.0]])
    phi = np.concatenate([[0.0], np.repeat(ph_ring, L), [math.pi]])
    rest = _rest_surface(theta, phi)
    top, bottom = 0, 1 + rings * L

    def vid(i, j):
        return 1 + i * L + (j % L)

    def tid(i, j):
        return i * (L + 1) + j

    R = rings * (L + 1)
    uu, vv = np.meshgrid(u_col, v_ring)
    pole_u = (np.arange(L) + 0.5) / L
    uvs = np.concatenate(
        [
            np.stack([uu.ravel(), vv.ravel()], axis=1),
            np.stack([pole_u, np.ones(L)], axis=1),
            np.stack([pole_u, np.zeros(L)], axis=1),
        ]
    )
    i, j = np.meshgrid(np.arange(rings - 1), np.arange(L), indexing="ij")
    i, j = i.ravel(), j.ravel()
    jl = np.arange(L)
    last = rings - 1
    vert_faces = [
        np.stack([np.full(L, top), vid(0, jl), vid(0, jl + 1)], axis=1),
        np.stack([vid(i, j), vid(i + 1, j), vid(i + 1, j + 1)], axis=1),
        np.stack([vid(i, j), vid(i + 1, j + 1), vid(i, j + 1)], axis=1),
        np.stack([vid(last, jl), np.full(L, bottom), vid(last, jl + 1)], axis=1),
    ]
    uv_faces = [
        np.stack([R + jl, tid(0, jl), tid(0, jl + 1)], axis=1),
        np.stack([tid(i, j), tid(i + 1, j), tid(i + 1, j + 1)], axis=1),
        np.stack([tid(i, j), tid(i + 1, j + 1), tid(i, j + 1)], axis=1),
        np.stack([tid(last, jl), R + L + jl, tid(last, jl + 1)], axis=1),
    ]
    return _Mesh(
        theta,
        phi,
        rest,
        np.concatenate(vert_faces).astype(np.int64),
        np.concatenate(uv_faces).astype(np.int64),
        uvs.astype(np.float32),
    )


# --------------------------------------------------------------------------- texture
def _box(th: np.ndarray, ph: np.ndarray, th_lim: tuple, ph_lim: tuple) -> tuple[slice, slice]:
    """Row/column slices of the texels whose (theta, phi) lie in the given ranges."""
    rows = np.nonzero((ph >= ph_lim[0]) & (ph <= ph_lim[1]))[0]
    cols = np.nonzero((th >= th_lim[0]) & (th <= th_lim[1]))[0]
    if len(rows) == 0 or len(cols) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    """A colour as float32 [3, 1, 1], to broadcast against [3, H, W] planes."""
    return np.array([r, g, b], dtype=np.float32)[:, None, None]


def _pow40(x: np.ndarray) -> np.ndarray:
    x5 = x * x
    x5 *= x5
    x5 *= x
    for _ in range(3):
        x5 *= x5
    return x5


class _TextureModel:
    """UV-space appearance of the synthetic head on a T x T texel grid.

    Arrays are channel-first float32 [3, T, T] (or [T, T]) with row i at uv
    v = (i + 0.5) / T (row 0 = v = 0, the bottom of the PNG on disk) and column j at
    u = (j + 0.5) / T. Colours are 0..255.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        c = (np.arange(size) + 0.5) / size
        self.th = _theta_of_u(c)  # [T] per column
        self.ph = _phi_of_v(c)  # [T] per row (decreasing: row 0 is the neck)
        th, ph = self.th[None, :], self.ph[:, None]
        a, g = np.abs(th), _gauss
        eps = 1e-4
        p = _rest_surface(th, ph)
        d_th = _rest_surface(th + eps, ph) - _rest_surface(th - eps, ph)
        d_ph = _rest_surface(th, ph + eps) - _rest_surface(th, ph - eps)
        n = np.cross(d_ph, d_th)
        n *= np.sign(np.sum(n * p, axis=-1, keepdims=True) + 1e-12)  # outward
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        self.P = np.ascontiguousarray(p.transpose(2, 0, 1), dtype=np.float32)  # [3, T, T] mm
        self.N = np.ascontiguousarray(n.transpose(2, 0, 1), dtype=np.float32)  # [3, T, T]
        del p, d_th, d_ph, n

        # base albedo: skin with low- and mid-frequency variation, cheeks, lips, brows, hair
        var = np.zeros((size, size))
        for amp, lo, hi in ((0.03, 2.0, 7.0), (0.007, 15.0, 35.0)):
            for _ in range(4):
                f1, f2 = rng.uniform(lo, hi, 2) * rng.choice([-1, 1], 2)
                var += amp * np.sin(f1 * th + f2 * ph + rng.uniform(0, 2 * math.pi))
        alb = _rgb(214, 168, 142) * (1.0 + var)
        alb += _rgb(16, -6, -6) * (g(a - 0.52, 0.14) * g(ph - 1.72, 0.12))
        lips = _smoothstep(0.35, 0.65, g(th, 0.26) * g(ph - _MOUTH_PHI, 0.05))
        alb += (_rgb(178, 92, 92) - alb) * lips
        brow_phi = 1.13 + 0.6 * (a - 0.42) ** 2
        brows = g(ph - brow_phi, 0.016) * _smoothstep(0.18, 0.25, a)
        brows = brows * (1 - _smoothstep(0.58, 0.66, a))
        alb += (_rgb(75, 55, 42) - alb) * brows
        hairline = 0.80 + 1.05 * _smoothstep(0.45, 2.5, a)
        hair = 1.0 - _smoothstep(hairline - 0.03, hairline + 0.03, ph)
        streaks = 1.0 + 0.18 * np.sin(70.0 * th + 6.0 * np.sin(3.0 * ph))
        alb += (_rgb(62, 44, 32) * streaks - alb) * hair
        self.albedo = alb.astype(np.float32)
        self.ao = (
            1.0
            - 0.35 * g(a - _EYE_THETA, 0.13) * g(ph - _EYE_PHI, 0.07)
            - 0.25 * g(a - 0.11, 0.05) * g(ph - 1.80, 0.03)
        ).astype(np.float32)
        self.ks = (
            0.05
            + 0.08 * g(th, 0.3) * g(ph - 1.0, 0.2)
            + 0.10 * g(th, 0.08) * g(ph - 1.65, 0.15)
            + 0.15 * lips
            - 0.04 * hair
        ).astype(np.float32)

        self.mouth = _box(self.th, self.ph, (-0.42, 0.42), (_MOUTH_PHI - 0.09, _MOUTH_PHI + 0.09))
        self.smile = _box(self.th, self.ph, (-0.6, 0.6), (1.70, 2.20))
        self.forehead = _box(self.th, self.ph, (-0.7, 0.7), (0.75, 1.10))
        self.eyes = [
            _box(self.th, self.ph, (s * _EYE_THETA - 0.12, s * _EYE_THETA + 0.12), (1.24, 1.36))
            for s in (-1, 1)
        ]
        # static eye content inside each eye box: sclera, iris, pupil and the eye ellipse
        self.eye_rgb, self.eye_mask = [], []
        for rs, cs in self.eyes:
            eth = (np.abs(self.th[cs])[None, :] - _EYE_THETA) / 0.10
            eph = (self.ph[rs][:, None] - _EYE_PHI) / 0.042
            mask = 1.0 - _smoothstep(0.8, 1.0, eth**2 + eph**2)
            r = np.hypot(eth * 0.10, eph * 0.042) / 0.034
            rgb = _rgb(232, 226, 220) + 0 * r
            rgb += (_rgb(70, 98, 122) - rgb) * (1 - _smoothstep(0.9, 1.0, r))
            rgb += (_rgb(14, 14, 18) - rgb) * (1 - _smoothstep(0.4, 0.5, r))
            self.eye_rgb.append(rgb.astype(np.float32))
            self.eye_mask.append(mask.astype(np.float32))

    def expression(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Albedo float32 [3, T, T] (0..255) and specular map [T, T] for weights w [4]."""
        jaw, smile, blink, brow = (float(x) for x in w)
        alb, ks = self.albedo.copy(), self.ks.copy()
        g = _gauss

        rs, cs = self.mouth
        th, ph = self.th[cs][None, :], self.ph[rs][:, None]
        d = ph - _MOUTH_PHI
        prof = np.sqrt(np.clip(1.0 - (th / 0.30) ** 2, 0.0, 1.0))
        hw = (0.045 * jaw + 0.004 * smile) * prof
        opening = np.clip((hw - np.abs(d)) / 0.003 + 0.3, 0.0, 1.0) * (prof > 0)
        teeth = np.clip((-0.45 * hw - d) / 0.003, 0.0, 1.0) * _smoothstep(0.006, 0.015, hw)
        depth = np.clip(np.abs(d) / (hw + 1e-6), 0.0, 1.0)
        inside = _rgb(45, 18, 20) * (0.6 + 0.4 * depth)
        inside += (_rgb(228, 222, 208) - inside) * teeth
        alb[:, rs, cs] += (inside - alb[:, rs, cs]) * opening
        ks[rs, cs] += (0.12 + 0.3 * teeth - ks[rs, cs]) * opening

        rs, cs = self.smile
        th, ph = self.th[cs][None, :], self.ph[rs][:, None]
        a = np.abs(th)
        fold_th = 0.14 + (ph - 1.80) * (0.24 / 0.28)
        fold = g(a - fold_th, 0.012) * _smoothstep(1.76, 1.84, ph)
        fold *= 1 - _smoothstep(2.05, 2.14, ph)
        alb[:, rs, cs] *= 1.0 - 0.35 * smile * fold
        alb[:, rs, cs] += _rgb(14, -4, -4) * (smile * g(a - 0.5, 0.12) * g(ph - 1.80, 0.08))

        rs, cs = self.forehead
        th, ph = self.th[cs][None, :], self.ph[rs][:, None]
        lines = (0.5 + 0.5 * np.cos(2 * math.pi * (ph - 0.80) / 0.05)) ** 4
        env = g(th, 0.28) * _smoothstep(0.78, 0.84, ph) * (1 - _smoothstep(1.02, 1.07, ph))
        alb[:, rs, cs] *= 1.0 - 0.28 * brow * lines * env

        for (rs, cs), rgb, mask in zip(self.eyes, self.eye_rgb, self.eye_mask, strict=True):
            eth = (np.abs(self.th[cs])[None, :] - _EYE_THETA) / 0.10
            ph = self.ph[rs][:, None]
            half = 0.042 * np.sqrt(np.clip(1.0 - eth**2, 0.0, 1.0))
            lid = _EYE_PHI - half + (0.18 + 0.85 * blink) * 2.0 * half
            seen = mask * _smoothstep(lid - 0.002, lid + 0.002, ph)
            alb[:, rs, cs] += (rgb - alb[:, rs, cs]) * seen
            lash = g(ph - lid, 0.003) * (np.abs(eth) < 1.0)
            alb[:, rs, cs] *= 1.0 - 0.45 * lash
            ks[rs, cs] += 0.5 * seen
        return alb, ks

    def _light(self, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World key light in head coordinates [3], n.l [T, T] and diffuse shade [T, T]."""
        light = (pose[:, :3].T @ _LIGHT_WORLD).astype(np.float32)
        ndl = np.tensordot(light, self.N, axes=1)
        shade = np.clip(ndl, 0.0, 1.0)
        shade *= 0.6
        shade += 0.5
        shade *= self.ao
        return light, ndl, shade

    def average(self, albedo: np.ndarray, pose: np.ndarray) -> np.ndarray:
        """View-independent texture (as averaging many cameras gives): uint8 [3, T, T]."""
        shade = self._light(pose)[2]
        return np.rint(np.clip(albedo * shade, 1.0, 255.0)).astype(np.uint8)

    def view(
        self,
        albedo: np.ndarray,
        ks: np.ndarray,
        pose: np.ndarray,
        cam: Camera,
        gain: np.ndarray,
        bias: np.ndarray,
    ) -> np.ndarray:
        """Texture unwrapped from one camera: uint8 [3, T, T], 0 where the texel faces away."""
        light, ndl, shade = self._light(pose)
        c_h = (pose[:, :3].T @ (cam.center - pose[:, 3])).astype(np.float32)
        v = c_h[:, None, None] - self.P  # texel -> camera, head frame
        v *= 1.0 / np.sqrt(np.einsum("kij,kij->ij", v, v))
        ndv = np.einsum("kij,kij->ij", self.N, v)
        v += light[:, None, None]  # half vector (unnormalized)
        ndh = np.einsum("kij,kij->ij", self.N, v)
        ndh *= 1.0 / np.sqrt(np.einsum("kij,kij->ij", v, v))
        np.clip(ndh, 0.0, 1.0, out=ndh)
        spec = _pow40(ndh)
        spec *= ks
        spec *= 255.0 * (ndl > 0)
        shade *= 0.8 + 0.2 * np.clip(ndv, 0.0, 1.0)
        col = albedo * shade
        col += spec
        col *= gain[:, None, None]
        col += bias[:, None, None]
        np.clip(col, 1.0, 255.0, out=col)
        col *= ndv > 0.05
        return np.rint(col).astype(np.uint8)


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
                w[:, k] = amp * _gauss(t[:, None] - events[None, :], 0.08).max(axis=1)
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
            poses[i, :, :3] = _rotation(yaw, pitch, roll)
            poses[i, :, 3] = _HEAD_WORLD + np.array([4.0, 3.0, 5.0]) * wave[i, 3:]
        frames = [f"{start + 3 * i:06d}" for i in range(n)]
        segments.append(_Segment(name, frames, w, poses))
        start += 3 * n + 300
    return segments


# --------------------------------------------------------------------------- writer
def _obj_static(mesh: _Mesh) -> str:
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

    The capture is written into a sibling ``<root>.partial`` folder first and renamed at
    the end, so an interrupted run never leaves a half-written root behind.
    """
    config = config or SyntheticCaptureConfig()
    final = Path(out_dir) / ROOT_NAME
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise AvatarqError(f"{final} already exists; remove it or pass overwrite=True")
    root = final.with_name(ROOT_NAME + ".partial")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    seeds = np.random.SeedSequence(config.seed).spawn(3)
    rng_cam, rng_motion, rng_skin = (np.random.default_rng(s) for s in seeds)
    cams, colour = _make_cameras(config, rng_cam)
    segments = _make_segments(config, rng_motion)
    mesh = _build_mesh(config.mesh_bands, config.mesh_sectors)
    tex_model = _TextureModel(config.texture_size, rng_skin)
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
            v = _deform(mesh.theta, mesh.phi, mesh.rest, w).astype(np.float32)
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
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return final
