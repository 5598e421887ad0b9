"""POCA's masks: which activations count when a layer is calibrated.

M = V_l * S (poca.md): V_l is the sample's texture visibility max-pooled to the layer's
output resolution, S the shape-wise std mask that drops the fraction ``tau`` of output
positions whose across-channel std is largest. Masks are float32 {0, 1} tensors
[B, 1, H, W] that broadcast over channels; layers with a non-spatial output (Linear) have
no mask (every value counts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError


def texture_size(decoder: torch.nn.Module) -> tuple[int, int]:
    """(H, W) texels of the decoder's texture output (its declaration's first output)."""
    from avatarq.models.declaration import declaration_of

    shape = declaration_of(decoder).texture_shape
    return int(shape[-2]), int(shape[-1])


@torch.no_grad()
def visibility_masks(
    decoder: torch.nn.Module,
    samples: CalibrationSamples,
    batch: int = 8,
    progress: Progress | None = None,
) -> torch.Tensor | None:
    """Texels each sample's camera sees: bool [N, T, T] (None when the samples have no cameras).

    The FP32 decoder's vertices (which must be de-normalized: the decoder was built with a
    `Normalization`) are rasterized with the sample's projection M at the capture
    resolution by `avatarq.render.visible_texels`; row index = v in the flipped-on-load
    texture orientation, the orientation of the decoder's texture output.
    """
    if samples.M is None:
        return None
    if not getattr(decoder, "denormalized", False):
        raise AvatarqError(
            "visibility masks need a decoder that outputs de-normalized vertices; build it "
            "with DeployableDecoder(model, normalization=...) or disable visibility"
        )
    from avatarq.calibration.samples import decoder_args
    from avatarq.models.declaration import declaration_of
    from avatarq.render import visible_texels

    if not declaration_of(decoder).mesh:
        raise AvatarqError("visibility masks need a decoder with a mesh output (--mesh-output)")
    height, tex_size = texture_size(decoder)
    if height != tex_size:
        raise AvatarqError(f"visibility masks need a square texture, got {height}x{tex_size}")
    out = torch.zeros(len(samples), tex_size, tex_size, dtype=torch.bool)
    for start in range(0, len(samples), batch):
        stop = min(start + batch, len(samples))
        vertices = decoder(*decoder_args(decoder, samples, start, stop))[1]
        out[start:stop] = visible_texels(
            vertices, samples.M[start:stop], samples.topology, samples.resolution, tex_size
        ).cpu()
        if progress is not None:
            progress("rasterizing visibility", stop, len(samples))
    return out


def pool_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Max-pool a mask [B, T, T] or [B, 1, T, T] to [B, 1, size, size] (kernel = stride =
    T / size); a larger ``size`` repeats texels (nearest). float32 {0, 1}."""
    m = mask.float()
    if m.dim() == 3:
        m = m[:, None]
    t = m.shape[-1]
    if size == t:
        return m
    if size < t:
        if t % size:
            raise AvatarqError(f"cannot pool a {t}x{t} mask to {size}x{size}: not a divisor")
        k = t // size
        return F.max_pool2d(m, kernel_size=k, stride=k)
    return F.interpolate(m, size=(size, size), mode="nearest")


def std_mask(y: torch.Tensor, tau: float) -> torch.Tensor:
    """Shape-wise std mask of a layer output y [B, C, H, W]: float32 [B, 1, H, W].

    sigma(h, w) = population std over channels of y[b, :, h, w] (ranked through its
    square, which orders positions the same way). Per sample, the
    floor(tau * H * W) positions with the largest sigma are dropped (ties: the position
    with the lower row-major index is dropped first; a stable sort) and the rest kept, so
    exactly H*W - floor(tau*H*W) positions remain: tau = 0 keeps all, tau = 0.9 keeps 10%.
    """
    if not 0.0 <= tau < 1.0:
        raise AvatarqError(f"tau must lie in [0, 1), got {tau}")
    b, _, h, w = y.shape
    n_keep = h * w - math.floor(tau * h * w)
    if n_keep == h * w:
        return torch.ones(b, 1, h, w)
    # rank by the variance: the same order as the std, without a slow strided std kernel
    y = y.detach().float()
    sigma = ((y - y.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).reshape(b, h * w)
    # t = the largest kept value (an O(HW) selection instead of a sort); every sigma < t is
    # kept, and of the sigma == t the highest positions fill the remaining places.
    t = sigma.kthvalue(n_keep, dim=1, keepdim=True).values
    keep = sigma < t
    tied = sigma == t
    room = n_keep - keep.sum(dim=1, keepdim=True)
    # rank of each tied position counted from the end (last tied position = 1)
    from_end = torch.flip(torch.cumsum(torch.flip(tied.int(), [1]), dim=1), [1])
    keep |= tied & (from_end <= room)
    return keep.float().view(b, 1, h, w)


def layer_mask(y: torch.Tensor, visibility: torch.Tensor | None, tau: float) -> torch.Tensor | None:
    """M = V_l * S for an output y [B, C, H, W] (None for non-spatial outputs [B, F]).

    ``visibility``: bool [B, T, T] texture visibility of the same samples, or None (all seen).
    """
    if y.dim() != 4:
        return None
    mask = std_mask(y, tau)
    if visibility is not None:
        mask = mask * pool_mask(visibility, y.shape[-1])
    return mask


def input_mask(out_mask: torch.Tensor | None, in_size: int) -> torch.Tensor | None:
    """The output mask carried to the layer's input resolution (max-pooled): an input
    position counts when some position it feeds counts."""
    if out_mask is None:
        return None
    return pool_mask(out_mask, in_size)
