"""Calibration samples: a fixed, seeded, recorded set of decoder inputs.

A sample is one (frame, camera) pair: the latent code z (encoder mean on the frame's
normalized average texture and mesh, or taken from a latent file), the view direction,
and, when a capture provides it, the camera's pixel projection M of head-local vertices.
Random samples come first; ordered clips (consecutive frames seen by one camera) follow
and are listed as index lists, which the temporal term and the jitter metrics need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from avatarq.errors import AvatarqError
from avatarq.render.topology import Topology

SampleId = tuple[str, str, str]  # (segment, frame, camera)


@dataclass(frozen=True)
class CalibrationSamples:
    """N decoder inputs and where they came from.

    Attributes:
        z: float32 [N, Z] latent codes.
        view: float32 [N, 3] unit view directions, head coordinates.
        ids: N (segment, frame, camera) string triples ("" where unknown).
        clips: ordered clips, each a tuple of sample indices in temporal order (disjoint).
        M: float32 [N, 3, 4] pixel projections of head-local vertices, or None.
        topology: mesh topology (needed with M to rasterize visibility).
        resolution: (height, width) of the capture images, pixels (needed with M).
        source: a human-readable note ("capture ...", "latents ...").
    """

    z: torch.Tensor
    view: torch.Tensor
    ids: tuple[SampleId, ...]
    clips: tuple[tuple[int, ...], ...] = ()
    M: torch.Tensor | None = None
    topology: Topology | None = None
    resolution: tuple[int, int] | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        z = torch.as_tensor(self.z).detach().float().cpu().contiguous()
        view = torch.as_tensor(self.view).detach().float().cpu().contiguous()
        if z.dim() != 2 or z.shape[0] == 0:
            raise AvatarqError(f"calibration z must be [N, Z] with N > 0, got {list(z.shape)}")
        n = z.shape[0]
        if tuple(view.shape) != (n, 3):
            raise AvatarqError(f"calibration view must be [{n}, 3], got {list(view.shape)}")
        if not (torch.isfinite(z).all() and torch.isfinite(view).all()):
            raise AvatarqError("calibration z / view hold NaN or infinite values")
        ids = tuple(tuple(str(p) for p in i) for i in self.ids)
        if len(ids) != n or any(len(i) != 3 for i in ids):
            raise AvatarqError(f"calibration ids must be {n} (segment, frame, camera) triples")
        clips = tuple(tuple(int(k) for k in c) for c in self.clips)
        used: set[int] = set()
        for c in clips:
            if len(c) < 2:
                raise AvatarqError("every calibration clip needs at least 2 frames")
            if any(not 0 <= k < n for k in c):
                raise AvatarqError(f"calibration clip indices must lie in 0..{n - 1}")
            if used & set(c) or len(set(c)) != len(c):
                raise AvatarqError("calibration clips must not share samples")
            used |= set(c)
        M = self.M
        if M is not None:
            M = torch.as_tensor(M).detach().float().cpu().contiguous()
            if tuple(M.shape) != (n, 3, 4):
                raise AvatarqError(f"calibration M must be [{n}, 3, 4], got {list(M.shape)}")
            if self.topology is None or self.resolution is None:
                raise AvatarqError(
                    "calibration samples with cameras need a topology and resolution"
                )
        resolution = None if self.resolution is None else tuple(int(r) for r in self.resolution)
        object.__setattr__(self, "z", z)
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "clips", clips)
        object.__setattr__(self, "M", M)
        object.__setattr__(self, "resolution", resolution)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def z_dim(self) -> int:
        return int(self.z.shape[1])

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Consecutive (previous, current) sample indices of every clip."""
        return [(c[i - 1], c[i]) for c in self.clips for i in range(1, len(c))]

    @property
    def hash(self) -> str:
        """sha256 (hex) of the ids, clips, z, view, M, resolution and topology."""
        h = hashlib.sha256()
        meta = {"ids": self.ids, "clips": self.clips, "resolution": self.resolution}
        h.update(json.dumps(meta, sort_keys=True).encode())
        arrays: list[np.ndarray] = [self.z.numpy(), self.view.numpy()]
        if self.M is not None:
            arrays.append(self.M.numpy())
        if self.topology is not None:
            arrays += [self.topology.vert_ids, self.topology.uv_ids, self.topology.uvs]
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{list(a.shape)}".encode())
            h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> CalibrationSamples:
        """The samples ``indices`` in that order (clips kept when all their frames are in)."""
        idx = [int(i) for i in indices]
        where = {k: j for j, k in enumerate(idx)}
        clips = tuple(tuple(where[k] for k in c) for c in self.clips if all(k in where for k in c))
        sel = torch.tensor(idx, dtype=torch.long)
        return CalibrationSamples(
            self.z[sel],
            self.view[sel],
            tuple(self.ids[k] for k in idx),
            clips,
            None if self.M is None else self.M[sel],
            self.topology,
            self.resolution,
            self.source,
        )

    def describe(self) -> dict:
        """JSON-ready record of the samples (what the artifact stores)."""
        return {
            "count": len(self),
            "hash": self.hash,
            "ids": [list(i) for i in self.ids],
            "clips": [list(c) for c in self.clips],
            "cameras": self.M is not None,
            "resolution": None if self.resolution is None else list(self.resolution),
            "source": self.source,
        }


def _draw_clips(
    rng: np.random.Generator, runs: list[list], n_clips: int, clip_length: int
) -> list[list]:
    """Up to ``n_clips`` windows of ``clip_length`` consecutive items from ``runs``."""
    usable = [r for r in runs if len(r) >= 2]
    if not usable or n_clips == 0:
        return []
    order = rng.permutation(len(usable))
    clips = []
    for k in range(n_clips):
        run = usable[int(order[k % len(usable)])]
        length = min(clip_length, len(run))
        start = int(rng.integers(0, len(run) - length + 1))
        clips.append(run[start : start + length])
    return clips


def _check_counts(n_random: int, n_clips: int, clip_length: int) -> None:
    if n_random < 0 or n_clips < 0:
        raise AvatarqError(f"sample counts must be >= 0, got {n_random} random, {n_clips} clips")
    if n_clips and clip_length < 2:
        raise AvatarqError(f"clip_length must be >= 2, got {clip_length}")
    if n_random + n_clips == 0:
        raise AvatarqError("ask for at least one calibration sample")


def samples_from_capture(
    model,
    capture,
    n_random: int = 64,
    n_clips: int = 2,
    clip_length: int = 8,
    seed: int = 0,
    cameras: Sequence[str] | None = None,
) -> CalibrationSamples:
    """Seeded samples from a Multiface capture, z = the encoder mean of each frame.

    Args:
        model: a `DeepAppearanceModel` with its encoder.
        capture: a `MultifaceCapture`.
        n_random: random (frame, camera) pairs, drawn without replacement when possible.
        n_clips, clip_length: ordered clips of consecutive frames of one segment, one camera.
        seed: numpy Generator seed; the same seed and capture give the same samples.
        cameras: the cameras to draw from (default: every camera of the KRT).
    """
    from avatarq.data.encode import encode_frames

    _check_counts(n_random, n_clips, clip_length)
    rng = np.random.default_rng(seed)
    cams = list(cameras) if cameras is not None else list(capture.cameras)
    for cam in cams:
        capture.camera(cam)
    if not cams:
        raise AvatarqError("the capture has no cameras to calibrate with")
    frames = list(capture.frames)
    total = len(frames) * len(cams)
    picks = rng.choice(total, size=n_random, replace=n_random > total) if n_random else []
    ids: list[SampleId] = [
        (frames[p // len(cams)][0], frames[p // len(cams)][1], cams[p % len(cams)]) for p in picks
    ]
    runs = [[(seg, f) for f in fids] for seg, fids in capture.clips()]
    clips = []
    for clip in _draw_clips(rng, runs, n_clips, clip_length):
        cam = cams[int(rng.integers(0, len(cams)))]
        clips.append(tuple(range(len(ids), len(ids) + len(clip))))
        ids += [(seg, f, cam) for seg, f in clip]
    z = encode_frames(model, capture, [(s, f) for s, f, _ in ids])
    view = np.stack([capture.view_direction(s, f, c) for s, f, c in ids])
    M = np.stack([capture.projection(s, f, c) for s, f, c in ids])
    return CalibrationSamples(
        z,
        torch.from_numpy(view),
        tuple(ids),
        tuple(clips),
        torch.from_numpy(M),
        capture.topology,
        capture.image_size,
        source=f"capture {capture.root.name}, seed {seed}, encoder mean",
    )


def samples_from_latents(
    sequence,
    n_random: int = 64,
    n_clips: int = 2,
    clip_length: int = 8,
    seed: int = 0,
    capture=None,
) -> CalibrationSamples:
    """Seeded samples from a `LatentSequence` (an ordered z, view sequence).

    Random samples are steps drawn without replacement (when possible); clips are windows
    of consecutive steps. With ``capture`` and segment/frame/camera labels in the sequence,
    each sample also gets its camera projection (visibility masks then apply).
    """
    _check_counts(n_random, n_clips, clip_length)
    rng = np.random.default_rng(seed)
    t = len(sequence)
    picks = [int(p) for p in rng.choice(t, size=n_random, replace=n_random > t)] if n_random else []
    clips: list[tuple[int, ...]] = []
    steps = list(picks)
    for clip in _draw_clips(rng, [list(range(t))], n_clips, clip_length):
        clips.append(tuple(range(len(steps), len(steps) + len(clip))))
        steps += clip

    def label(name: str, k: int, default: str) -> str:
        a = getattr(sequence, name)
        return default if a is None else str(a[k])

    ids = tuple(
        (label("segment", k, ""), label("frame", k, str(k)), label("camera", k, "")) for k in steps
    )
    sel = np.asarray(steps, dtype=np.int64)
    M = topology = resolution = None
    if capture is not None:
        if sequence.segment is None or sequence.frame is None or sequence.camera is None:
            raise AvatarqError(
                "to use a capture's cameras the latent file needs segment, frame and camera labels"
            )
        M = torch.from_numpy(np.stack([capture.projection(s, f, c) for s, f, c in ids]))
        topology, resolution = capture.topology, capture.image_size
    return CalibrationSamples(
        torch.from_numpy(sequence.z[sel]),
        torch.from_numpy(sequence.view[sel]),
        ids,
        tuple(clips),
        M,
        topology,
        resolution,
        source=f"latent sequence ({t} steps), seed {seed}",
    )
