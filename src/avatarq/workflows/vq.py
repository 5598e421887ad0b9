"""``avatarq vq``: train the latent-stream codebook on a capture's latent codes and store it
as a file, as a bundle component, or both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.codec import Codebook, VQConfig, load_codebook, train_codebook
from avatarq.core.documents import attributes
from avatarq.core.files import check_parent
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError


@dataclass
class VQResult:
    """What `train_vq` made: the codebook and where it was written."""

    codebook: Codebook
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        shape = ("codebook_size", "stages", "groups", "group_dims", "bits_per_frame", "frames")
        return attributes(self.codebook, (*shape, "seed", "source")) | {
            "train_mse": list(self.codebook.train_mse),
            "written": {k: str(v) for k, v in self.paths.items()},
        }


def capture_latents(
    checkpoint: str | Path, capture: str | Path, segments: tuple[str, ...] = ()
) -> tuple[np.ndarray, str]:
    """Encoder means of every frame of ``segments`` (all segments when empty) of the capture:
    (z float32 [N, Z], one line naming them)."""
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import encode_frames
    from avatarq.models.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise AvatarqError(f"--model {checkpoint}: checkpoint not found")
    cap = MultifaceCapture(capture)
    known = cap.segments
    unknown = [s for s in segments if s not in known]
    if unknown:
        raise AvatarqError(
            f"--segment {unknown[0]!r} is not a segment of {cap.root}; it has {', '.join(known)}"
        )
    wanted = list(segments) or known
    frames = [(seg, fid) for seg, fid in cap.frames if seg in wanted]
    model = load_checkpoint(checkpoint)
    z = encode_frames(model, cap, frames).numpy()
    return z, f"encoder means of {len(frames)} frames of {', '.join(wanted)} ({cap.root.name})"


def file_latents(path: str | Path) -> tuple[np.ndarray, str]:
    """z of a latent file (`avatarq.data.latents`): (float32 [N, Z], one line)."""
    from avatarq.data.latents import load_inputs

    inputs = load_inputs(path)
    return inputs.z, f"latent file {Path(path).name} ({len(inputs)} steps)"


def _check_output_file(out: Path, force: bool) -> None:
    """Refuse an output that exists and is not a codebook avatarq wrote (or is one and not
    ``force``), before any work."""
    if out.is_symlink() or out.exists() and not out.is_file():
        raise AvatarqError(f"-o {out} exists and is not a file; choose another output")
    if out.exists():
        try:
            load_codebook(out)
        except AvatarqError:
            raise AvatarqError(
                f"-o {out} exists and is not an avatarq codebook; refusing to replace it"
            ) from None
        if not force:
            raise AvatarqError(f"-o {out} exists; pass --force to replace that codebook")
    check_parent(out)


def train_vq(
    config: VQConfig,
    *,
    checkpoint: str | Path | None = None,
    capture: str | Path | None = None,
    segments: tuple[str, ...] = (),
    latents: str | Path | None = None,
    out: str | Path | None = None,
    bundle: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> VQResult:
    """Train a codebook on a capture's latent codes (``checkpoint`` + ``capture``) or on a
    latent file (``latents``), then write it to ``out`` and/or into ``bundle``.

    Every output and input is checked before the (slow) encoding starts.

    Raises:
        AvatarqError: neither or both latent sources; no output; an output that is not
            avatarq's or exists without ``force``; a bundle whose z size differs; the
            training errors of `train_codebook`.
    """
    if (latents is None) == (checkpoint is None and capture is None):
        raise AvatarqError(
            "train on a capture (--model dam.pt --capture CAPTURE) or on a latent file "
            "(--latents z.npz), one of the two"
        )
    if latents is not None and segments:
        raise AvatarqError("--segment picks capture segments; a latent file has none")
    if latents is None and (checkpoint is None or capture is None):
        missing = "--capture" if capture is None else "--model"
        raise AvatarqError(
            f"encoding a capture needs both --model and --capture; {missing} is missing"
        )
    if out is None and bundle is None:
        raise AvatarqError("say where the codebook goes: -o codebook.npz and/or --bundle dam.avq")
    opened = None
    if bundle is not None:
        from avatarq.export.bundle import open_bundle_to_extend

        opened = open_bundle_to_extend(bundle, "codebook", "a codebook", force)
    if out is not None:
        out = Path(out)
        _check_output_file(out, force)
    if progress is not None:
        progress("latent codes")
    if latents is not None:
        z, source = file_latents(latents)
    else:
        z, source = capture_latents(checkpoint, capture, segments)
    if opened is not None and z.shape[1] != opened.manifest.z_dim:
        raise AvatarqError(
            f"the training latents have {z.shape[1]} dimensions, bundle {opened.root} decodes "
            f"z of {opened.manifest.z_dim}"
        )
    if progress is not None:
        progress(f"k-means ({config.stages} stage(s) x {config.groups} group(s))")
    book = train_codebook(z, config, source)
    result = VQResult(book)
    if out is not None:
        result.paths["file"] = book.save(out)
    if opened is not None:
        record = opened.add_codebook(book, force=force)
        result.paths["bundle"] = opened.root / record.path
    return result
