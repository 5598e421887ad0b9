"""Turn capture frames into what a decoder consumes: latent codes and normalization."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from avatarq.data.capture import MultifaceCapture
from avatarq.errors import AvatarqError
from avatarq.models.dam import DeepAppearanceModel
from avatarq.models.deploy import Normalization


def capture_normalization(capture: MultifaceCapture) -> Normalization:
    """The capture's tex_mean/tex_std/vert_mean/vert_std as a `Normalization`."""
    return Normalization(capture.tex_mean, capture.tex_std, capture.vert_mean, capture.vert_std)


def resize_texture(texture: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, T, T] -> [B, 3, size, size] by area averaging (or bilinear when enlarging)."""
    if texture.shape[-1] == size:
        return texture
    mode = "area" if texture.shape[-1] > size else "bilinear"
    return F.interpolate(texture, size=(size, size), mode=mode)


def encoder_inputs(
    capture: MultifaceCapture, frames: Sequence[tuple[str, str]], tex_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized average textures [N, 3, tex_size, tex_size] and meshes [N, 3V] of ``frames``."""
    tex = torch.from_numpy(np.stack([capture.normalized_texture(seg, fid) for seg, fid in frames]))
    mesh = torch.from_numpy(
        np.stack([capture.normalized_vertices(seg, fid) for seg, fid in frames])
    )
    return resize_texture(tex, tex_size), mesh


@torch.no_grad()
def encode_frames(
    model: DeepAppearanceModel,
    capture: MultifaceCapture,
    frames: Sequence[tuple[str, str]],
    batch: int = 8,
) -> torch.Tensor:
    """Latent codes z = encoder mean for each (segment, frame): float32 [N, Z]."""
    if not model.config.has_encoder:
        raise AvatarqError("this checkpoint has no encoder (enc.*); pass a latent file instead")
    if capture.vert_mean.size != model.config.mesh_size:
        raise AvatarqError(
            f"capture meshes have {capture.vert_mean.size // 3} vertices, the model "
            f"{model.config.n_vertices}"
        )
    codes = []
    for start in range(0, len(frames), batch):
        tex, mesh = encoder_inputs(capture, frames[start : start + batch], model.config.tex_size)
        mu, _ = model.encode(tex, mesh)
        codes.append(mu)
    return torch.cat(codes)
