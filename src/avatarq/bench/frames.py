"""What the harness measures with: de-normalization to [0, 1] units, the render stage, and
the worst frame kept for the report's strip."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.bench.results import BenchConfig, FrameStrip
from avatarq.bench.sequences import BenchSequence
from avatarq.errors import AvatarqError, InternalError

TEXTURE_PEAK = 255.0


# --------------------------------------------------------------------------- helpers


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class Denorm:
    """Maps decoder outputs to what is measured: texture in [0, 1] units, vertices in
    capture units (identity scale when the bundle folds the de-normalization in)."""

    tex_mean: np.ndarray | None = None  # float32 [3, T, T], 0..255
    tex_std: float = 1.0
    vert_mean: np.ndarray | None = None  # float32 [V, 3]
    vert_std: float = 1.0
    # texture units per 1.0: 255 for 0..255 textures; None until measured for a bundle whose
    # normalization is unknown (then the reference's first-frame range, as the comparator)
    peak: float | None = TEXTURE_PEAK
    units: str = "0..255 texels / 255"

    def texture(self, tex: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """[B, 3, T, T] decoder units -> [0, 1] units, a new array of ``dtype``."""
        x = tex.astype(dtype, copy=True)
        if self.tex_mean is not None:
            x *= self.tex_std
            x += self.tex_mean
        if self.peak is None:
            raise InternalError("texture peak used before it was measured")
        x /= self.peak
        return x

    def vertices(self, vert: np.ndarray) -> np.ndarray:
        if self.vert_mean is None:
            return np.array(vert, dtype=np.float32, copy=True)
        return vert * np.float32(self.vert_std) + self.vert_mean


def denorm_for(bundle: Any, capture_root: Path | None) -> Denorm:
    """Folded: identity; else the bundle's normalization arrays, else the capture's; with
    neither, metrics are taken in normalized units (peak measured on the reference)."""
    m = bundle.manifest
    if m.normalization.folded:
        return Denorm()
    arrays = bundle.normalization_arrays()
    if arrays is not None:
        return Denorm(
            arrays["tex_mean"].astype(np.float32),
            float(arrays["tex_std"]),
            arrays["vert_mean"].reshape(-1, 3).astype(np.float32),
            float(arrays["vert_std"]),
        )
    if capture_root is None:
        return Denorm(peak=None, units="Multiface-normalized units / reference first-frame range")
    import torch

    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import resize_texture

    cap = MultifaceCapture(capture_root)
    mean = resize_texture(torch.from_numpy(cap.tex_mean)[None], m.tex_size)[0].numpy()
    vmean = cap.vert_mean.reshape(-1, 3)
    if vmean.shape[0] != m.n_vertices:
        raise AvatarqError(
            f"capture {capture_root} has {vmean.shape[0]} vertices, bundle {bundle.root} "
            f"{m.n_vertices}"
        )
    return Denorm(mean.astype(np.float32), cap.tex_std, vmean.astype(np.float32), cap.vert_std)


def display_texture(tex: np.ndarray) -> np.ndarray:
    """[3, T, T] decoder orientation (row 0 = v 0) -> [T, T, 3] display (row 0 = top)."""
    return np.ascontiguousarray(np.moveaxis(tex, 0, -1)[::-1], dtype=np.float32)


def crop_box(mask: np.ndarray, margin: float = 0.08) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask > 0)
    h, w = mask.shape
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad = int(math.ceil(margin * max(r1 - r0, c1 - c0)))
    return slice(max(r0 - pad, 0), min(r1 + pad, h)), slice(max(c0 - pad, 0), min(c1 + pad, w))


class Worst:
    """Keeps the lowest-PSNR frame seen so far (the earliest on ties)."""

    def __init__(self, space: str) -> None:
        self.space = space
        self.strip: FrameStrip | None = None

    def offer(
        self,
        t: int,
        frame_id: str,
        value: float,
        ref: np.ndarray,
        dep: np.ndarray,
        mask: np.ndarray | None = None,
    ) -> None:
        """Frame ``t`` with PSNR ``value``: textures [3, T, T] (decoder orientation), or
        screen images [H, W, 3] with the reference's foreground ``mask`` [H, W]."""
        if self.strip is not None and not value < self.strip.psnr:
            return
        if mask is None:
            ref, dep = display_texture(ref), display_texture(dep)
        else:
            box = crop_box(mask)
            ref, dep, mask = ref[box].copy(), dep[box].copy(), mask[box].copy()
        self.strip = FrameStrip(self.space, t, frame_id, value, ref, dep, mask)


# --------------------------------------------------------------------------- render


@dataclass
class RenderSetup:
    renderer: Any
    device: Any  # torch.device
    M: np.ndarray  # float32 [T, 3, 4] at the render resolution
    record: dict[str, Any]


def setup_render(
    bundle: Any, sequence: BenchSequence, config: BenchConfig
) -> tuple[RenderSetup | None, str | None]:
    """(render setup, None) or (None, why nothing is rendered)."""
    if config.render == "none":
        return None, "rendering off (render none)"
    explicit = config.render != "auto"
    if bundle.manifest.n_vertices == 0:
        if explicit:
            raise AvatarqError(
                f"render {config.render} needs a mesh, but the decoder of {bundle.root} has no "
                "mesh output (--mesh-output); pass --render none"
            )
        return None, "the decoder has no mesh output"
    if not sequence.has_camera:
        if explicit:
            raise AvatarqError(
                f"render {config.render} needs a camera, but the sequence ({sequence.source}) "
                "has none; pass a capture (--capture) or --render none"
            )
        return None, "the sequence has no camera (no capture given)"
    if not bundle.topology_path.is_file() and not explicit:
        return None, f"bundle {bundle.root} has no topology.npz"
    topology = bundle.topology()  # AvatarqError naming the fix when missing
    import torch

    from avatarq.render import RenderConfig, Renderer

    resolution = config.resolution or sequence.image_size
    renderer = Renderer(topology, RenderConfig(resolution=resolution, backend=config.render))
    if renderer.backend == "nvdiffrast" or torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    record = {
        "backend": renderer.backend,
        "resolution": list(resolution),
        "camera_image_size": list(sequence.image_size),
        "device": str(device),
        "perspective_correct": renderer.config.perspective_correct,
        "antialias": renderer.config.antialias,
        "mask": "foreground of the FP32 render, per frame",
    }
    return RenderSetup(renderer, device, sequence.projection_at(resolution), record), None


def render(setup: RenderSetup, vert: np.ndarray, tex: np.ndarray, M: np.ndarray) -> Any:
    """Render float32 copies of vertices [B, V, 3], texture [B, 3, T, T], M [B, 3, 4]."""
    import torch

    d, f32 = setup.device, torch.float32
    return setup.renderer.render(
        torch.from_numpy(vert).to(d, f32),
        torch.from_numpy(tex).to(d, f32),
        torch.from_numpy(np.ascontiguousarray(M)).to(d, f32),
    )
