"""Latent files: an ordered sequence of decoder inputs in one .npz (`DecoderInputs` on disk).

A latent file drives a decoder without a capture: calibration samples, benchmark sequences
and jitter tests all read it. Keys of the .npz:

    z        float32 [T, Z]   latent codes, in temporal order
    view     float32 [T, 3]   unit view directions in head coordinates
    <name>   float32 [T, ...] any other decoder input, by the name the decoder declares
    camera   str [T]          optional, camera name per step
    frame    str [T]          optional, frame id per step
    segment  str [T]          optional, segment name per step

The steps form one ordered clip. Labels become the inputs' (segment, frame, camera) ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avatarq.core.files import atomic_path, existing_file
from avatarq.core.inputs import DecoderInputs
from avatarq.core.npz import load_npz
from avatarq.errors import AvatarqError

LABELS = ("segment", "frame", "camera")


def has_labels(inputs: DecoderInputs) -> bool:
    """Whether every step names its segment, frame and camera."""
    return all(all(part for part in frame_id) for frame_id in inputs.ids)


def save_inputs(inputs: DecoderInputs, path: str | Path) -> Path:
    """Write ``inputs`` as a latent .npz (uncompressed; .npz appended when missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays: dict[str, np.ndarray] = dict(inputs.arrays)
    clash = sorted(set(arrays) & set(LABELS))
    if clash:
        raise AvatarqError(f"input names {clash} clash with the label keys of a latent file")
    for k, name in enumerate(LABELS):
        values = [frame_id[k] for frame_id in inputs.ids]
        if any(values):
            arrays[name] = np.asarray(values, dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_inputs(path: str | Path, source: str | None = None) -> DecoderInputs:
    """Read a latent .npz (see the module docstring) into `DecoderInputs`."""
    path = existing_file(path, "latent file")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise AvatarqError(f"{path} is a single .npy array, not a latent .npz")
    data = load_npz(path, "latent file")
    arrays = {k: v for k, v in data.items() if k not in LABELS}
    labels = {k: v for k, v in data.items() if k in LABELS}
    if "z" in arrays and "view" not in arrays or "view" in arrays and "z" not in arrays:
        missing = "view" if "z" in arrays else "z"
        raise AvatarqError(
            f"{path} is missing {missing} (a latent file holds z [T, Z] and view [T, 3], "
            "optionally segment, frame, camera [T])"
        )
    if not arrays:
        raise AvatarqError(f"{path} holds no input arrays (expected z [T, Z] and view [T, 3])")
    first = next(iter(arrays.values()))
    if first.ndim < 1 or first.shape[0] == 0:
        raise AvatarqError(f"{path}: input arrays must be [T, ...] with T > 0")
    try:
        n = int(first.shape[0])
        ids = []
        for name, values in labels.items():
            if values.shape != (n,):
                raise AvatarqError(f"label {name} must be [T] = [{n}], got {list(values.shape)}")
        for t in range(n):
            ids.append(
                tuple(
                    str(labels[name][t]) if name in labels else ("" if name != "frame" else str(t))
                    for name in LABELS
                )
            )
        return DecoderInputs(
            arrays,
            tuple(ids),
            clips=(tuple(range(n)),) if n >= 2 else (),
            source=source or f"latent file {path.name} ({n} steps)",
        )
    except AvatarqError as exc:
        raise AvatarqError(f"{path}: {exc}") from None
