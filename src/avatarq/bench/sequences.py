"""Ordered sequences that `avatarq bench` plays through a decoder.

A `BenchSequence` is T decoder inputs in temporal order plus, optionally, the camera each
frame is seen through:

    z      float32 [T, Z]     latent codes
    view   float32 [T, 3]     unit view directions, head coordinates
    M      float32 [T, 3, 4]  pixel projection of head-local vertices per frame, or None
                              (None: texture-space metrics only, nothing is rendered)

Where sequences come from (`load_sequence` dispatches on the ``--sequence`` text):

- a capture segment ``CAPTURE:SEGMENT[:CAMERA]``: every frame of the segment in temporal
  order, z = the encoder mean of the checkpoint (a bundle holds no encoder, so the
  checkpoint is required), view and M from the capture for CAMERA;
- a latent file ``latents.npz`` (`avatarq.data.latents`): z and view as stored; M
  per frame from the capture when the file labels every step with segment, frame and
  camera, else one fixed default camera of the capture, else None;
- nothing: the default clip - the first segment of the capture when a capture and a
  checkpoint are given (for the embedded synthetic avatar that is its first expression
  clip), else `avatarq.core.inputs.smooth_clip`, a smooth seeded latent trajectory.

The default camera is the capture camera that looks most frontally at the head: the one
whose view direction (first frame of the capture) is closest to the mean view direction
of all cameras, unless the bundle folds one camera's colour correction in, which then
is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.core.files import existing_file
from avatarq.core.inputs import DecoderInputs, FrameId, smooth_clip
from avatarq.errors import AvatarqError

DEFAULT_CLIP_FRAMES = 32
DEFAULT_CLIP_SEED = 0
DEFAULT_CONE_DEG = 25.0  # views of the default clip without a capture


@dataclass(frozen=True, eq=False)
class BenchSequence:
    """T ordered decoder inputs (`DecoderInputs`, T >= 2) and the capture they came from.

    Attributes:
        inputs: z [T, Z], view [T, 3], ids, and the camera M [T, 3, 4] that sees each
            frame with its image size (or no camera: texture-space metrics only).
        capture_root: the capture the sequence (or its camera) came from, if any.
    """

    inputs: DecoderInputs
    capture_root: Path | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.inputs) < 2:
            raise AvatarqError(
                f"a bench sequence needs T >= 2 ordered frames (temporal metrics compare "
                f"consecutive frames), got {len(self.inputs)}"
            )

    @classmethod
    def of(
        cls,
        z: np.ndarray,
        view: np.ndarray,
        M: np.ndarray | None,
        ids: tuple[FrameId, ...] | None,
        source: str,
        image_size: tuple[int, int] | None = None,
        capture_root: Path | None = None,
    ) -> BenchSequence:
        n = np.asarray(z).shape[0] if np.ndim(z) else 0
        inputs = DecoderInputs.from_z_view(
            z,
            view,
            ids=ids or (),
            clips=(tuple(range(n)),) if n >= 2 else (),
            M=M,
            image_size=image_size,
            source=source,
        )
        return cls(inputs, capture_root)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def z(self) -> np.ndarray:
        return self.inputs.z

    @property
    def view(self) -> np.ndarray:
        return self.inputs.view

    @property
    def M(self) -> np.ndarray | None:
        return self.inputs.M

    @property
    def ids(self) -> tuple[str, ...]:
        """Frame labels, e.g. "E001_Jaw_Open/000100/400004" or "t0007"."""
        return self.inputs.labels

    @property
    def source(self) -> str:
        return self.inputs.source

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.inputs.image_size

    @property
    def z_dim(self) -> int:
        return self.inputs.z_dim

    @property
    def has_camera(self) -> bool:
        return self.inputs.has_camera

    def projection_at(self, resolution: tuple[int, int]) -> np.ndarray:
        """M rescaled to render at ``resolution`` (H, W) instead of `image_size`.

        The same camera seen at another pixel size: the x row of M scales by W' / W, the
        y row by H' / H (pixel centres follow the half-pixel convention only
        approximately, which is what resizing a photograph does too).

        Returns:
            float32 [T, 3, 4].
        """
        if self.M is None:
            raise AvatarqError("this sequence has no camera (M); nothing can be rendered")
        h, w = self.image_size
        scale = np.array([resolution[1] / w, resolution[0] / h, 1.0], np.float32)
        return self.M * scale[None, :, None]

    def check_z_dim(self, z_dim: int, what: str = "the bundle") -> None:
        """AvatarqError unless the sequence has z and view and the latent size is ``z_dim``."""
        for name in ("z", "view"):
            if name not in self.inputs.arrays:
                raise AvatarqError(f"a bench sequence needs input {name} ({self.source})")
        if self.z_dim != z_dim:
            raise AvatarqError(
                f"sequence latents have size {self.z_dim} ({self.source}) but {what} "
                f"decodes z of size {z_dim}; use latents made with the model of this bundle"
            )

    def check_inputs(self, specs: Any, what: str = "the bundle") -> None:
        """AvatarqError unless the sequence holds every input of ``specs`` (the manifest's
        `TensorSpec`s, shapes ["batch", ...]) in its per-step shape."""
        for spec in specs:
            if spec.name not in self.inputs.arrays:
                raise AvatarqError(
                    f"the sequence ({self.source}) has no array {spec.name!r}, an input of "
                    f"{what} (it holds {', '.join(self.inputs.arrays)})"
                )
            self.inputs.check_array(spec.name, [int(d) for d in spec.shape[1:]], what)

    def feeds(self, index: Any) -> dict[str, np.ndarray]:
        """{input name: array rows ``index``} (a slice or an index list)."""
        return {name: array[index] for name, array in self.inputs.arrays.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the report."""
        return {
            "source": self.source,
            "n_frames": len(self),
            "z_dim": self.z_dim if "z" in self.inputs.arrays else None,
            "has_camera": self.has_camera,
            "image_size": None if self.image_size is None else list(self.image_size),
            "capture_root": None if self.capture_root is None else str(self.capture_root),
            "ids": list(self.ids),
        }


# --------------------------------------------------------------------------- cameras


def default_camera(capture: Any, camera_index: int | None = None) -> str:
    """The camera a sequence without one is seen through (see the module docstring).

    Args:
        capture: a `MultifaceCapture`.
        camera_index: the bundle's folded colour-correction camera (manifest ``camera``),
            an index into the capture's KRT order; None picks the most frontal camera.
    """
    names = list(capture.cameras)
    if not names:
        raise AvatarqError(f"capture {capture.root} has no cameras in its KRT")
    if camera_index is not None:
        if not 0 <= camera_index < len(names):
            raise AvatarqError(
                f"the bundle folds camera {camera_index} in, but capture {capture.root} has "
                f"{len(names)} cameras"
            )
        return names[camera_index]
    seg, frame = capture.frames[0]
    views = np.stack([capture.view_direction(seg, frame, n) for n in names]).astype(np.float64)
    mean = views.mean(axis=0)
    return names[int(np.argmax(views @ mean))]


def _resolve_camera(capture: Any, camera: str | None, camera_index: int | None) -> str:
    if camera is None:
        return default_camera(capture, camera_index)
    capture.camera(camera)  # AvatarqError naming the known cameras
    return camera


# --------------------------------------------------------------------------- sources


def sequence_from_capture(
    capture: Any,
    segment: str,
    checkpoint: str | Path,
    camera: str | None = None,
    camera_index: int | None = None,
    max_frames: int | None = None,
) -> BenchSequence:
    """Every frame of ``segment`` in temporal order, encoded with ``checkpoint``'s encoder.

    Args:
        capture: a `MultifaceCapture` (or its root path).
        segment: segment name.
        checkpoint: the Multiface DAM checkpoint with its encoder (z = encoder mean).
        camera: KRT camera name (None: `default_camera`).
        camera_index: the bundle's folded camera, used when ``camera`` is None.
        max_frames: keep only the first frames (None: all).

    Returns:
        BenchSequence with view and M of ``camera`` per frame.
    """
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import encode_frames
    from avatarq.models.checkpoint import load_checkpoint

    if not isinstance(capture, MultifaceCapture):
        capture = MultifaceCapture(capture)
    cam = _resolve_camera(capture, camera, camera_index)
    _, frames = next(capture.clips(segment))
    if max_frames is not None:
        frames = frames[:max_frames]
    if len(frames) < 2:
        raise AvatarqError(
            f"segment {segment!r} of {capture.root} has {len(frames)} frame(s); temporal "
            "metrics need at least 2 consecutive frames"
        )
    checkpoint = existing_file(checkpoint, "checkpoint")
    model = load_checkpoint(checkpoint)
    z = encode_frames(model, capture, [(segment, f) for f in frames]).numpy()
    source = f"capture segment {segment} ({len(frames)} frames, camera {cam}, encoder mean)"
    return posed_sequence(capture, segment, frames, cam, z, source)


def posed_sequence(
    capture: Any,
    segment: str,
    frames: Sequence[str],
    cam: str,
    z: np.ndarray,
    source: str,
    label: str | None = None,
    rendering: Any = None,
) -> BenchSequence:
    """z [T, Z] at ``frames`` of ``capture``'s ``segment`` with camera ``cam``'s view
    direction [T, 3] and projection M [T, 3, 4] at each frame's head pose; ids
    (``label`` or the segment, frame, cam). ``rendering``: the capture whose image size and
    root the render stage uses (default: ``capture``)."""
    rendering = capture if rendering is None else rendering
    return BenchSequence.of(
        z=z,
        view=np.stack([capture.view_direction(segment, f, cam) for f in frames]),
        M=np.stack([capture.projection(segment, f, cam) for f in frames]),
        ids=tuple((label or segment, f, cam) for f in frames),
        source=source,
        image_size=rendering.image_size,
        capture_root=rendering.root,
    )


def sequence_from_latents(
    path: str | Path,
    capture: Any = None,
    camera: str | None = None,
    camera_index: int | None = None,
) -> BenchSequence:
    """A latent-sequence .npz, with cameras from ``capture`` when one is given.

    M per frame: from the capture's projection of each step's (segment, frame, camera)
    when the file labels all three for every step (``camera`` overrides the stored
    camera); otherwise one fixed camera (``camera``, or `default_camera`) at the head pose
    of the capture's first frame. Without a capture M is None.
    """
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.latents import has_labels, load_inputs

    latents = load_inputs(path)
    if len(latents) < 2:
        raise AvatarqError(
            f"{path} holds {len(latents)} step; temporal metrics need at least 2 ordered steps"
        )
    name = Path(path).name
    if capture is None:
        return BenchSequence(latents)
    if not isinstance(capture, MultifaceCapture):
        capture = MultifaceCapture(capture)
    segments = [i[0] for i in latents.ids]
    frames = [i[1] for i in latents.ids]
    stored = [i[2] for i in latents.ids]
    labelled = all(segments) and all(frames)
    if labelled and (camera is not None or has_labels(latents)):
        cams = [camera] * len(latents) if camera is not None else stored
        M = np.stack(
            [capture.projection(s, f, c) for s, f, c in zip(segments, frames, cams, strict=True)]
        )
        how = "cameras and head poses of its labelled frames"
    else:
        cam = _resolve_camera(capture, camera, camera_index)
        seg, frame = capture.frames[0]
        M = np.repeat(capture.projection(seg, frame, cam)[None], len(latents), axis=0)
        how = f"fixed camera {cam} at the pose of {seg}/{frame}"
    return BenchSequence.of(
        latents.z,
        latents.view,
        M,
        latents.ids,
        f"latent file {name} ({len(latents)} steps; {how})",
        image_size=capture.image_size,
        capture_root=capture.root,
    )


def default_sequence(
    z_dim: int,
    capture: Any = None,
    checkpoint: str | Path | None = None,
    camera: str | None = None,
    camera_index: int | None = None,
    n_frames: int = DEFAULT_CLIP_FRAMES,
) -> BenchSequence:
    """The sequence `avatarq bench` plays when none is named.

    With a capture and a checkpoint: the capture's first segment (`sequence_from_capture`).
    Otherwise `avatarq.core.inputs.smooth_clip` (``n_frames`` frames); with a capture, seen through
    its default camera (view and M of that camera at the capture's first frame), else
    frontal view (0, 0, 1) and no camera.
    """
    from avatarq.data.capture import MultifaceCapture

    if capture is not None and not isinstance(capture, MultifaceCapture):
        capture = MultifaceCapture(capture)
    if capture is not None and checkpoint is not None:
        return sequence_from_capture(capture, capture.segments[0], checkpoint, camera, camera_index)
    if capture is None:
        return BenchSequence(
            smooth_clip(z_dim, n_frames, DEFAULT_CLIP_SEED, cone_deg=DEFAULT_CONE_DEG)
        )
    cam = _resolve_camera(capture, camera, camera_index)
    seg, frame = capture.frames[0]
    v = capture.view_direction(seg, frame, cam)
    clip = smooth_clip(z_dim, n_frames, DEFAULT_CLIP_SEED, front=tuple(float(x) for x in v))
    M = np.repeat(capture.projection(seg, frame, cam)[None], n_frames, axis=0)
    return BenchSequence.of(
        clip.z,
        clip.view,
        M,
        None,
        f"{clip.source[:-1]}, camera {cam})",
        image_size=capture.image_size,
        capture_root=capture.root,
    )


def parse_capture_spec(text: str) -> tuple[Path, str, str | None]:
    """Split ``CAPTURE:SEGMENT[:CAMERA]`` into (capture root, segment, camera or None).

    The capture path may itself contain ':'; the split that names an existing directory
    wins (SEGMENT alone first, then SEGMENT:CAMERA).
    """
    for parts in (text.rsplit(":", 1), text.rsplit(":", 2)):
        if len(parts) >= 2 and parts[0] and Path(parts[0]).is_dir() and all(parts[1:]):
            return Path(parts[0]), parts[1], parts[2] if len(parts) == 3 else None
    raise AvatarqError(
        f"--sequence {text!r} is neither a latent file (.npz) nor CAPTURE:SEGMENT[:CAMERA] "
        "with an existing capture directory"
    )


def load_sequence(
    spec: str | Path | None,
    z_dim: int | None,
    checkpoint: str | Path | None = None,
    capture: str | Path | None = None,
    camera_index: int | None = None,
) -> BenchSequence:
    """Resolve the ``--sequence`` text of `avatarq bench` (see the module docstring).

    Args:
        spec: ``CAPTURE:SEGMENT[:CAMERA]``, a latent ``.npz`` file, or None (default clip).
        z_dim: the bundle's latent size; a sequence of another size is an AvatarqError
            (None: a declared decoder's bundle, whose inputs the caller checks; it needs
            a latent file).
        checkpoint: needed to encode capture frames.
        capture: capture root for cameras (latent files, default clip) and the default
            clip's frames.
        camera_index: the bundle's folded camera (default camera choice).
    """
    if spec is None and z_dim is None:
        raise AvatarqError(
            "a bundle of your own decoder benches on --sequence latents.npz holding its inputs"
        )
    if spec is None:
        assert z_dim is not None
        seq = default_sequence(z_dim, capture, checkpoint, camera_index=camera_index)
    else:
        text = str(spec)
        path = Path(text)
        if path.suffix == ".npz" or path.is_file():
            seq = sequence_from_latents(path, capture, camera_index=camera_index)
        else:
            root, segment, camera = parse_capture_spec(text)
            if checkpoint is None:
                raise AvatarqError(
                    "encoding a capture segment needs the checkpoint's encoder (a bundle has "
                    "none): pass --checkpoint dam.pt, or a latent file as --sequence"
                )
            seq = sequence_from_capture(root, segment, checkpoint, camera, camera_index)
    if z_dim is not None:
        seq.check_z_dim(z_dim)
    return seq


def with_image_size(sequence: BenchSequence, image_size: tuple[int, int]) -> BenchSequence:
    """The same sequence declaring that its M projects into ``image_size`` (H, W)."""
    return replace(sequence, inputs=replace(sequence.inputs, image_size=tuple(image_size)))
