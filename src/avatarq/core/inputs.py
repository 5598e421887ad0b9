"""`DecoderInputs`: the one container of what a decoder is fed, and the smooth-clip generator.

Calibration samples, benchmark sequences, latent files and comparison inputs are all T
decoder inputs plus where they came from:

    arrays   name -> float32 [T, ...]  the decoder's inputs by name; a DAM reads
                                       z [T, Z] (latent codes) and view [T, 3] (unit view
                                       directions, head coordinates)
    ids      T (segment, frame, camera) string triples ("" where unknown; all "" by default)
    clips    ordered clips: tuples of indices in temporal order (disjoint, >= 2 each)
    M        float32 [T, 3, 4] pixel projection of head-local vertices per input, or None
             (p = M [v; 1], column = p_x / p_z, row = p_y / p_z)
    image_size  (H, W) pixels of the images M projects into (required with M)
    source   one line saying where the inputs came from

`smooth_clip` draws the seeded smooth trajectory every command uses when no recorded
sequence is given (bench's default clip, `avatarq compare`, build checks, data-free
calibration).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatarq.core.hashing import update_with_array
from avatarq.errors import AvatarqError

FrameId = tuple[str, str, str]  # (segment, frame, camera)
CLIP_FPS = 30.0


def _float_array(name: str, value: Any, n: int | None) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim < 1 or a.shape[0] == 0 or any(d == 0 for d in a.shape):
        raise AvatarqError(f"input {name} must be [T, ...] with T > 0, got shape {list(a.shape)}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise AvatarqError(f"input {name} must hold real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise AvatarqError(f"input {name} must hold real numbers, got dtype {a.dtype}")
    if n is not None and a.shape[0] != n:
        raise AvatarqError(f"input {name} has {a.shape[0]} steps, the others have {n}")
    if not np.isfinite(a).all():
        raise AvatarqError(f"input {name} holds NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def frame_label(frame_id: FrameId) -> str:
    """``segment/frame/camera`` without the empty parts, e.g. ``E001/000100/400004``."""
    return "/".join(p for p in frame_id if p)


@dataclass(frozen=True, eq=False)
class DecoderInputs:
    """T decoder inputs (see the module docstring for each field's contract).

    Arrays are converted to C-contiguous float32 and checked (finite, same T); a DAM's
    inputs are ``z`` [T, Z] and ``view`` [T, 3].
    """

    arrays: Mapping[str, np.ndarray]
    ids: tuple[FrameId, ...] = ()
    clips: tuple[tuple[int, ...], ...] = ()
    M: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.arrays:
            raise AvatarqError("decoder inputs need at least one named array")
        arrays: dict[str, np.ndarray] = {}
        n: int | None = None
        for name, value in self.arrays.items():
            arrays[str(name)] = _float_array(str(name), value, n)
            n = arrays[str(name)].shape[0]
        assert n is not None
        if "view" in arrays and arrays["view"].shape[1:] != (3,):
            raise AvatarqError(f"input view must be [T, 3], got {list(arrays['view'].shape)}")
        if "z" in arrays and arrays["z"].ndim != 2:
            raise AvatarqError(f"input z must be [T, Z], got {list(arrays['z'].shape)}")
        ids = (
            tuple((str(i[0]), str(i[1]), str(i[2])) for i in self.ids)
            if self.ids
            else tuple(("", "", "") for _ in range(n))
        )
        if len(ids) != n:
            raise AvatarqError(f"inputs have {n} steps but {len(ids)} ids")
        clips = tuple(tuple(int(k) for k in c) for c in self.clips)
        used: set[int] = set()
        for c in clips:
            if len(c) < 2:
                raise AvatarqError("every clip needs at least 2 frames")
            if any(not 0 <= k < n for k in c):
                raise AvatarqError(f"clip indices must lie in 0..{n - 1}")
            if used & set(c) or len(set(c)) != len(c):
                raise AvatarqError("clips must not share inputs")
            used |= set(c)
        M = self.M
        if M is not None:
            M = np.asarray(M)
            if M.shape != (n, 3, 4) or not np.issubdtype(M.dtype, np.number):
                raise AvatarqError(f"camera projections M must be [{n}, 3, 4], got {list(M.shape)}")
            if not np.isfinite(M).all():
                raise AvatarqError("camera projections M hold NaN or infinite values")
            M = np.ascontiguousarray(M, dtype=np.float32)
            if self.image_size is None:
                raise AvatarqError("inputs with cameras (M) need image_size (H, W)")
        size = None
        if self.image_size is not None:
            h, w = (int(x) for x in self.image_size)
            if h < 1 or w < 1:
                raise AvatarqError(f"image_size must be positive (H, W), got {self.image_size}")
            size = (h, w)
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "clips", clips)
        object.__setattr__(self, "M", M)
        object.__setattr__(self, "image_size", size)

    @classmethod
    def from_z_view(cls, z: Any, view: Any, **kwargs: Any) -> DecoderInputs:
        """Inputs of a DAM decoder: z [T, Z] and view [T, 3] (numpy or torch)."""
        return cls({"z": _numpy(z), "view": _numpy(view)}, **kwargs)

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise AvatarqError(
                f"these inputs have no array {name!r} (they hold {', '.join(self.arrays)})"
            ) from None

    @property
    def z(self) -> np.ndarray:
        """float32 [T, Z] latent codes."""
        return self["z"]

    @property
    def view(self) -> np.ndarray:
        """float32 [T, 3] unit view directions, head coordinates."""
        return self["view"]

    @property
    def z_dim(self) -> int:
        return int(self.z.shape[1])

    @property
    def has_camera(self) -> bool:
        return self.M is not None

    @property
    def labels(self) -> tuple[str, ...]:
        """One display label per step (`frame_label`; ``t0007`` for unlabelled step 7)."""
        return tuple(frame_label(i) or f"t{k:04d}" for k, i in enumerate(self.ids))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Consecutive (previous, current) indices of every clip."""
        return [(c[i - 1], c[i]) for c in self.clips for i in range(1, len(c))]

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The named arrays of steps start..stop-1 (views, contiguous)."""
        return {k: v[start:stop] for k, v in self.arrays.items()}

    def subset(self, indices: Sequence[int]) -> DecoderInputs:
        """Steps ``indices`` in that order (clips kept when all their steps are in)."""
        idx = [int(i) for i in indices]
        where = {k: j for j, k in enumerate(idx)}
        clips = tuple(tuple(where[k] for k in c) for c in self.clips if all(k in where for k in c))
        sel = np.asarray(idx, dtype=np.int64)
        return DecoderInputs(
            {k: v[sel] for k, v in self.arrays.items()},
            tuple(self.ids[k] for k in idx),
            clips,
            None if self.M is None else self.M[sel],
            self.image_size,
            self.source,
        )

    def check_array(self, name: str, shape: Sequence[int], what: str = "the decoder") -> None:
        """AvatarqError unless array ``name`` has per-step shape ``shape``."""
        got = tuple(self[name].shape[1:])
        if got != tuple(shape):
            raise AvatarqError(
                f"input {name} has per-step shape {list(got)} ({self.source or 'given'}) but "
                f"{what} takes {list(shape)}; use inputs made for this model"
            )

    def hash_into(self, digest: Any) -> None:
        """Feed ids, clips, image size and every array to a hashlib digest (stable order)."""
        meta = {"ids": self.ids, "clips": self.clips, "resolution": self.image_size}
        digest.update(json.dumps(meta, sort_keys=True).encode())
        for name in ("z", "view"):
            if name in self.arrays:
                update_with_array(digest, self.arrays[name])
        for name in sorted(set(self.arrays) - {"z", "view"}):
            update_with_array(digest, self.arrays[name], name)
        if self.M is not None:
            update_with_array(digest, self.M)

    @property
    def hash(self) -> str:
        """sha256 (hex) of `hash_into`."""
        h = hashlib.sha256()
        self.hash_into(h)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (counts, shapes, labels, source)."""
        return {
            "source": self.source,
            "n_frames": len(self),
            "arrays": {k: list(v.shape[1:]) for k, v in self.arrays.items()},
            "clips": [list(c) for c in self.clips],
            "has_camera": self.has_camera,
            "image_size": None if self.image_size is None else list(self.image_size),
            "ids": list(self.labels),
        }


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _smooth_unit_process(rng: np.random.Generator, n_frames: int, dims: int) -> np.ndarray:
    """[T, dims] sums of 4 cosines, random frequencies 0.2..1.2 Hz at 30 frames/s and random
    phases, each dimension marginally of mean 0 and variance 1, smooth from frame to frame."""
    k = 4
    freq = rng.uniform(0.2, 1.2, (k, dims))
    phase = rng.uniform(0.0, 2 * math.pi, (k, dims))
    t = np.arange(n_frames, dtype=np.float64)[:, None, None] / CLIP_FPS
    return np.sqrt(2.0 / k) * np.cos(2 * math.pi * freq[None] * t + phase[None]).sum(axis=1)


def cone_view(
    yaw_pitch: np.ndarray, front: Sequence[float] = (0.0, 0.0, 1.0), cone_deg: float = 25.0
) -> np.ndarray:
    """Unit view directions [T, 3] tilted from ``front`` by yaw/pitch in [-1, 1] x cone_deg.

    ``yaw_pitch``: float [T, 2], clipped to [-1, 1]; yaw turns about the head's y axis,
    pitch about the x axis, so (0, 0) is ``front`` itself.
    """
    f = np.asarray(front, np.float64)
    norm = np.linalg.norm(f)
    if f.shape != (3,) or not np.isfinite(norm) or norm == 0:
        raise AvatarqError(f"front must be a non-zero 3-vector, got {list(front)}")
    f = f / norm
    up = np.array([0.0, 1.0, 0.0]) if abs(f[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(up, f)
    right /= np.linalg.norm(right)
    up = np.cross(f, right)
    angles = np.radians(cone_deg) * np.clip(yaw_pitch, -1.0, 1.0)
    yaw, pitch = angles[:, 0:1], angles[:, 1:2]
    v = np.cos(pitch) * (np.cos(yaw) * f + np.sin(yaw) * right) + np.sin(pitch) * up
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def smooth_clip(
    z_dim: int,
    n_frames: int = 32,
    seed: int = 0,
    z_mean: np.ndarray | None = None,
    z_std: np.ndarray | None = None,
    front: Sequence[float] = (0.0, 0.0, 1.0),
    cone_deg: float = 0.0,
) -> DecoderInputs:
    """A seeded smooth trajectory of DAM inputs: z [T, Z] and view [T, 3].

    Each latent dimension is a smooth process (`_smooth_unit_process`) marginally close to
    N(0, 1), the VAE prior a Multiface decoder is trained against, then shifted and scaled
    per dimension by ``z_mean`` / ``z_std`` when a recorded latent distribution is known
    (float [Z] each). The view stays within ``cone_deg`` degrees of ``front`` (0: fixed at
    ``front``), moving as smoothly as z.
    """
    if isinstance(z_dim, bool) or not isinstance(z_dim, int | np.integer) or z_dim < 1:
        raise AvatarqError(f"z_dim must be a positive integer, got {z_dim!r}")
    if isinstance(n_frames, bool) or not isinstance(n_frames, int | np.integer) or n_frames < 2:
        raise AvatarqError(f"a clip needs at least 2 frames, got {n_frames!r}")
    if not (math.isfinite(cone_deg) and 0.0 <= cone_deg < 90.0):
        raise AvatarqError(f"cone_deg must be in [0, 90), got {cone_deg}")
    rng = np.random.default_rng(seed)
    z = _smooth_unit_process(rng, int(n_frames), int(z_dim))
    for name, stat in (("z_std", z_std), ("z_mean", z_mean)):
        if stat is not None and np.asarray(stat).shape != (z_dim,):
            raise AvatarqError(f"{name} must be [{z_dim}], got {list(np.asarray(stat).shape)}")
    if z_std is not None:
        z = z * np.asarray(z_std, np.float64)[None]
    if z_mean is not None:
        z = z + np.asarray(z_mean, np.float64)[None]
    if cone_deg > 0:
        view = cone_view(np.tanh(_smooth_unit_process(rng, int(n_frames), 2)), front, cone_deg)
    else:
        f = np.asarray(front, np.float64)
        view = np.repeat((f / np.linalg.norm(f))[None], n_frames, axis=0)
    return DecoderInputs(
        {"z": z, "view": view},
        clips=(tuple(range(int(n_frames))),),
        source=f"smooth latent clip ({n_frames} frames, seed {seed}"
        + (f", views within {cone_deg:g} deg of the front" if cone_deg > 0 else "")
        + (", recorded latent distribution" if z_mean is not None or z_std is not None else "")
        + ")",
    )
