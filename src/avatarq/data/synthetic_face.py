"""The procedural head of the synthetic avatar: its mesh, UV atlas, expressions and texture.

Geometry and appearance only; `avatarq.data.synthetic_capture` places it in a camera rig,
animates it and writes the capture. Conventions (millimetres, head-local axes, UV atlas,
expression weights) are described there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avatarq.data.capture import Camera

_MOUTH_PHI = 2.025  # the line between the lips
_EYE_THETA, _EYE_PHI = 0.44, 1.30  # eye centres (|theta|, phi) in radians
_LIGHT_WORLD = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
#: Texture detail levels of `TextureModel`.
DETAILS = ("standard", "fine")


# --------------------------------------------------------------------------- helpers
def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * (x / sigma) ** 2)


def _warp(lo: float, hi: float, centre: float, width: float, gain: float):
    """Monotonic map [lo, hi] -> [0, 1] whose density is 1 + gain * gauss(centre, width),
    and its inverse; used to give the face more UV area and more mesh vertices."""
    x = np.linspace(lo, hi, 8193)
    dens = 1.0 + gain * gauss(x - centre, width)
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


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


# --------------------------------------------------------------------------- geometry
def _relief(th: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """Displacement (mm) of facial features along the skull normal; broadcasts th, ph."""
    a = np.abs(th)
    g = gauss
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


def deform(th: np.ndarray, ph: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Apply expression weights w [4] (EXPRESSIONS order) to rest points p [N, 3]."""
    jaw, smile, blink, brow = (float(x) for x in w)
    a, g = np.abs(th), gauss
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
class Mesh:
    theta: np.ndarray  # [V] per-vertex surface coordinates (poles: theta 0)
    phi: np.ndarray  # [V]
    rest: np.ndarray  # [V, 3] rest positions, mm
    vert_ids: np.ndarray  # [F, 3] 0-based
    uv_ids: np.ndarray  # [F, 3] 0-based
    uvs: np.ndarray  # [Vt, 2]


def build_mesh(bands: int, sectors: int) -> Mesh:
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
    return Mesh(
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


class TextureModel:
    """UV-space appearance of the synthetic head on a T x T texel grid.

    Arrays are channel-first float32 [3, T, T] (or [T, T]) with row i at uv
    v = (i + 0.5) / T (row 0 = v = 0, the bottom of the PNG on disk) and column j at
    u = (j + 0.5) / T. Colours are 0..255.

    ``detail="fine"`` adds texel-scale content (`FineDetail`: pores, skin grain, hair
    strands, fine wrinkles that deepen with the expression), drawn from ``detail_rng`` so
    that everything else is identical to ``detail="standard"``.
    """

    def __init__(
        self,
        size: int,
        rng: np.random.Generator,
        detail: str = "standard",
        detail_rng: np.random.Generator | None = None,
    ) -> None:
        if detail not in DETAILS:
            raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
        c = (np.arange(size) + 0.5) / size
        self.th = _theta_of_u(c)  # [T] per column
        self.ph = _phi_of_v(c)  # [T] per row (decreasing: row 0 is the neck)
        th, ph = self.th[None, :], self.ph[:, None]
        a, g = np.abs(th), gauss
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
        self.fine: FineDetail | None = None
        if detail == "fine":
            self.fine = FineDetail(self.th, self.ph, hair, detail_rng or np.random.default_rng(0))
            self.albedo *= self.fine.static

    def expression(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Albedo float32 [3, T, T] (0..255) and specular map [T, T] for weights w [4]."""
        jaw, smile, blink, brow = (float(x) for x in w)
        alb, ks = self.albedo.copy(), self.ks.copy()
        g = gauss

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
        if self.fine is not None:
            alb *= self.fine.dynamic(smile, brow)
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


# --------------------------------------------------------------------------- fine detail
def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (texels) of a [T, T] map; wraps around u, clamps v."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = gauss(np.arange(-r, r + 1, dtype=np.float64), sigma)
    k /= k.sum()
    out = np.zeros_like(x)
    for i, w in enumerate(k):
        out += w * np.roll(x, i - r, axis=1)
    padded = np.pad(out, ((r, r), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for i, w in enumerate(k):
        out += w * padded[i : i + x.shape[0]]
    return out


class FineDetail:
    """Texel-scale detail of the ``fine`` synthetic face: multiplicative albedo maps.

    ``static`` float32 [T, T]: pores (dark dots ~1 texel wide on the skin, denser on the
    nose and cheeks), skin grain (noise at 1-2 texels) and hair strands (thin streaks
    along the hair a few texels apart, with per-strand brightness). ``dynamic(smile,
    brow)`` float32 [T, T]: fine wrinkles (crow's feet at the eye corners deepening with
    the smile, fine forehead lines with the brow raise, a few texels apart), 1 where
    neutral. Spatial sizes are in texels, so a larger texture holds more of it.
    """

    def __init__(
        self, th: np.ndarray, ph: np.ndarray, hair: np.ndarray, rng: np.random.Generator
    ) -> None:
        size = th.shape[0]
        thg, phg = th[None, :], ph[:, None]
        a, g = np.abs(thg), gauss
        hair = np.broadcast_to(hair, (size, size))
        skin = 1.0 - np.clip(hair, 0.0, 1.0)
        # pores: sparse impulses blurred to ~1 texel, denser on the nose and cheeks
        density = 0.012 * (1.0 + 2.0 * g(a - 0.35, 0.25) * g(phg - 1.70, 0.18))
        dots = (rng.random((size, size)) < density).astype(np.float64)
        dots *= rng.uniform(0.5, 1.0, (size, size))
        pores = _blur(dots, 0.7)
        pores /= max(pores.max(), 1e-12)
        grain = _blur(rng.standard_normal((size, size)), 0.8)
        grain /= max(grain.std(), 1e-12)
        # hair strands: a streak every ~3 texels along phi, each with its own brightness
        col = np.arange(size, dtype=np.float64)
        wobble = 1.5 * np.sin(phg * 9.0 + rng.uniform(0, 2 * math.pi))
        phase = 2 * math.pi * (col[None, :] + wobble) / 3.1
        strand_gain = np.repeat(rng.uniform(0.6, 1.4, size // 3 + 2), 3)[:size]
        strands = 0.5 + 0.5 * np.cos(phase)
        strands = strands**3 * strand_gain[None, :]
        static = 1.0 - 0.28 * pores * skin + 0.035 * grain * skin
        static *= 1.0 + 0.30 * (strands - 0.3) * hair
        self.static = np.clip(static, 0.3, 1.6).astype(np.float32)
        # fine wrinkles: lines every ~4 texels (row direction for the forehead, radial
        # around the outer eye corners for the crow's feet)
        row = np.arange(size, dtype=np.float64)[:, None]
        forehead = (0.5 + 0.5 * np.cos(2 * math.pi * row / 4.3)) ** 6
        forehead = forehead * g(thg, 0.35) * g(phg - 0.92, 0.10)
        corner_th, corner_ph = _EYE_THETA + 0.13, _EYE_PHI
        ang = np.arctan2(phg - corner_ph, (a - corner_th) * 0.6)
        rad = np.hypot(a - corner_th, phg - corner_ph)
        crow = (0.5 + 0.5 * np.cos(ang * 38.0)) ** 6
        crow = crow * g(rad - 0.07, 0.035) * (a > corner_th - 0.02)
        self._forehead = forehead.astype(np.float32)
        self._crow = crow.astype(np.float32)

    def dynamic(self, smile: float, brow: float) -> np.ndarray:
        """Wrinkle shading for expression weights in [0, 1]: float32 [T, T] in (0, 1]."""
        return 1.0 - (0.06 + 0.30 * smile) * self._crow - (0.04 + 0.30 * brow) * self._forehead
