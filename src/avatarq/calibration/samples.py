"""Calibration samples: a fixed, seeded, recorded set of decoder inputs.

A sample is one (frame, camera) pair: the latent code z (encoder mean on the frame's
normalized average texture and mesh, or taken from a latent file), the view direction,
and, when a capture provides it, the camera's pixel projection M of head-local vertices.
Random samples come first; ordered clips (consecutive frames seen by one camera) follow
and are listed as index lists, which the temporal term and the jitter metrics need.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avatarq.core.hashing import update_with_array
from avatarq.core.inputs import DecoderInputs, FrameId
from avatarq.core.topology import Topology
from avatarq.errors import AvatarqError

SampleId = FrameId  # (segment, frame, camera)


@dataclass(frozen=True, eq=False)
class CalibrationSamples:
    """N decoder inputs to calibrate on (`DecoderInputs`) and the mesh to see them with.

    Random samples come first, then the ordered clips (``inputs.clips``) that the temporal
    term needs. The array views below are torch tensors sharing the inputs' memory.

    Attributes:
        inputs: z [N, Z], view [N, 3], (segment, frame, camera) ids, clips, and camera
            projections M [N, 3, 4] with the capture's image size when cameras are known.
        topology: mesh topology (needed with M to rasterize visibility).
    """

    inputs: DecoderInputs
    topology: Topology | None = None

    def __post_init__(self) -> None:
        if self.inputs.M is not None and self.topology is None:
            raise AvatarqError("calibration samples with cameras need a topology")

    @classmethod
    def of(
        cls,
        z: Any,
        view: Any,
        ids: Sequence[SampleId],
        clips: Sequence[Sequence[int]] = (),
        M: Any = None,
        topology: Topology | None = None,
        resolution: tuple[int, int] | None = None,
        source: str = "",
    ) -> CalibrationSamples:
        """Samples from arrays (numpy or torch): z [N, Z], view [N, 3], M [N, 3, 4] or None."""
        if M is not None and (topology is None or resolution is None):
            raise AvatarqError("calibration samples with cameras need a topology and resolution")
        inputs = DecoderInputs.from_z_view(
            z,
            view,
            ids=tuple(ids),
            clips=tuple(tuple(c) for c in clips),
            M=None if M is None else _numpy(M),
            image_size=resolution if M is not None else None,
            source=source,
        )
        return cls(inputs, topology)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def z(self) -> torch.Tensor:
        """float32 [N, Z] latent codes."""
        return torch.from_numpy(self.inputs.z)

    @property
    def view(self) -> torch.Tensor:
        """float32 [N, 3] unit view directions, head coordinates."""
        return torch.from_numpy(self.inputs.view)

    def args(
        self, names: Sequence[str], start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The arrays ``names`` of samples start..stop-1 as torch tensors, in that order
        (what a decoder declaring those inputs takes positionally)."""
        return tuple(torch.from_numpy(self.inputs[name])[start:stop] for name in names)

    @property
    def M(self) -> torch.Tensor | None:
        """float32 [N, 3, 4] pixel projections of head-local vertices, or None."""
        return None if self.inputs.M is None else torch.from_numpy(self.inputs.M)

    @property
    def ids(self) -> tuple[SampleId, ...]:
        return self.inputs.ids

    @property
    def clips(self) -> tuple[tuple[int, ...], ...]:
        return self.inputs.clips

    @property
    def resolution(self) -> tuple[int, int] | None:
        """(height, width) of the capture images, pixels, when cameras are known."""
        return self.inputs.image_size

    @property
    def source(self) -> str:
        return self.inputs.source

    @property
    def z_dim(self) -> int:
        return self.inputs.z_dim

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Consecutive (previous, current) sample indices of every clip."""
        return self.inputs.pairs

    @property
    def hash(self) -> str:
        """sha256 (hex) of the ids, clips, z, view, M, resolution and topology."""
        h = hashlib.sha256()
        self.inputs.hash_into(h)
        if self.topology is not None:
            for a in (self.topology.vert_ids, self.topology.uv_ids, self.topology.uvs):
                update_with_array(h, a)
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> CalibrationSamples:
        """The samples ``indices`` in that order (clips kept when all their frames are in)."""
        return CalibrationSamples(self.inputs.subset(indices), self.topology)

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


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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
    return CalibrationSamples.of(
        z,
        view,
        tuple(ids),
        tuple(clips),
        M,
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
    """Seeded samples from ordered `DecoderInputs` (a latent file: z, view or any named
    arrays a declared decoder takes, labels).

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

    ids = tuple(sequence.ids[k] for k in steps)
    sel = np.asarray(steps, dtype=np.int64)
    M = topology = resolution = None
    if capture is not None:
        from avatarq.data.latents import has_labels

        if not has_labels(sequence):
            raise AvatarqError(
                "to use a capture's cameras the latent file needs segment, frame and camera labels"
            )
        M = np.stack([capture.projection(s, f, c) for s, f, c in ids])
        topology, resolution = capture.topology, capture.image_size
    source = f"latent sequence ({t} steps), seed {seed}"
    if set(sequence.arrays) == {"z", "view"}:
        return CalibrationSamples.of(
            sequence.z[sel], sequence.view[sel], ids, tuple(clips), M, topology, resolution, source
        )
    inputs = DecoderInputs(
        {name: array[sel] for name, array in sequence.arrays.items()},
        ids,
        tuple(clips),
        M,
        resolution if M is not None else None,
        source,
    )
    return CalibrationSamples(inputs, topology)


#: Views of data-free samples stay within this angle of the front (degrees).
PRIOR_CONE_DEG = 25.0


def samples_from_prior(
    z_dim: int,
    n_random: int = 64,
    n_clips: int = 2,
    clip_length: int = 8,
    seed: int = 0,
    front: Sequence[float] = (0.0, 0.0, 1.0),
    cone_deg: float = PRIOR_CONE_DEG,
) -> CalibrationSamples:
    """Data-free samples: a DAM is a VAE whose latent prior is N(0, I).

    Random samples draw z ~ N(0, I) and a view direction uniformly in yaw and pitch within
    ``cone_deg`` of ``front``; the clips are smooth trajectories of the same statistics
    (`avatarq.core.inputs.smooth_clip`), so the temporal term still has ordered frames.
    There are no cameras, hence no visibility masks.
    """
    from avatarq.core.inputs import cone_view, smooth_clip

    _check_counts(n_random, n_clips, clip_length)
    if n_clips and clip_length < 2:
        raise AvatarqError(f"clip_length must be >= 2, got {clip_length}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_random, z_dim))
    view = cone_view(rng.uniform(-1.0, 1.0, (n_random, 2)), front, cone_deg)
    zs, views, clips = [z], [view], []
    for k in range(n_clips):
        clip = smooth_clip(
            z_dim, clip_length, seed=seed * 1000 + k + 1, front=front, cone_deg=cone_deg
        )
        start = n_random + k * clip_length
        clips.append(tuple(range(start, start + clip_length)))
        zs.append(clip.z)
        views.append(clip.view)
    n = n_random + n_clips * clip_length
    ids = tuple(("prior", f"{k:06d}", "") for k in range(n))
    return CalibrationSamples.of(
        np.concatenate(zs).astype(np.float32),
        np.concatenate(views).astype(np.float32),
        ids,
        tuple(clips),
        source=f"data-free: z ~ N(0, I), views within {cone_deg:g} deg of the front, seed {seed}",
    )


def decoder_args(
    decoder: torch.nn.Module, samples: CalibrationSamples, start: int = 0, stop: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Samples start..stop-1 as the positional inputs of ``decoder`` (its declaration's
    order: z, view for a DAM)."""
    from avatarq.models.declaration import declaration_of

    return samples.args(declaration_of(decoder).input_names, start, stop)


def check_samples(decoder: torch.nn.Module, samples: CalibrationSamples) -> None:
    """AvatarqError unless ``samples`` hold every input ``decoder`` declares, in its shape."""
    from avatarq.models.declaration import declaration_of

    declaration = declaration_of(decoder)
    for spec in declaration.inputs:
        if spec.name not in samples.inputs.arrays:
            raise AvatarqError(
                f"the calibration data has no array {spec.name!r} (it holds "
                f"{', '.join(samples.inputs.arrays)}); the decoder declares "
                f"{', '.join(str(s) for s in declaration.inputs)}"
            )
        samples.inputs.check_array(spec.name, spec.shape)
