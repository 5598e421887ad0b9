"""PiCA-style decoders, as in NPVA (``conallwang/NPVA``, ``networks/``): the ``pica`` arch.

A block (`ConvUpBlock`, NPVA's layout and key names)::

    conv1.conv   3x3 conv without bias          [B, Cin, S, S] -> [B, C, S, S]
    conv1.bias   untied bias, one per texel      [C, S, S]
    conv1.bn     BatchNorm2d(C)
    conv2        1x1 conv to 4C (with bias)      -> [B, 4C, S, S]
    LeakyReLU(0.2), PixelShuffle(2)              -> [B, C', 2S, 2S]   (C' = C)

The latent is z [B, Z] read as [B, Z / 64, 8, 8] (NPVA: Z = 256, 4 x 8 x 8). The decoder
(``dec`` of a `DeepAppearanceModel` with arch ``pica``) has NPVA's ``geomDecoder`` (latent
-> position map [B, 3, G, G]) and a texture decoder ``texDecoder`` (latent and the view
direction broadcast to 8 x 8 -> texture [B, 3, T, T]); each vertex reads the position map
at its texture coordinate (``vertex_uv``, a buffer [V, 2] saved with the weights), by
bilinear ``grid_sample``. At export (`fold_batch_norm`) every BatchNorm folds into the
conv before it and its untied bias, so a block is conv + bias add + 1x1 conv + LeakyReLU +
DepthToSpace in the graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatarq.errors import AvatarqError

LATENT_SIDE = 8
LEAKY = 0.2
#: Channels of the first block's output; each later block halves them, down to MIN_CHANNELS.
FIRST_CHANNELS = 64
MIN_CHANNELS = 8


class UntiedBiasConvBN(nn.Module):
    """NPVA's ``Conv2dBNUB``: bn(conv(x) + bias[None]); conv 3x3 without bias, bias [C, S, S]."""

    def __init__(self, cin: int, cout: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(cout, size, size))
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.bias[None])


class UntiedBiasConv(nn.Module):
    """conv(x) + bias[None]: an `UntiedBiasConvBN` with its BatchNorm folded in."""

    def __init__(self, conv: nn.Conv2d, bias: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias[None]


class ConvUpBlock(nn.Module):
    """[B, Cin, S, S] -> [B, C, 2S, 2S] (see the module docstring)."""

    def __init__(self, cin: int, cout: int, size: int) -> None:
        super().__init__()
        self.conv1: nn.Module = UntiedBiasConvBN(cin, cout, size)
        self.conv2 = nn.Conv2d(cout, 4 * cout, 1)
        self.relu = nn.LeakyReLU(LEAKY)
        self.ps = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ps(self.relu(self.conv2(self.conv1(x))))


class Upsampler(nn.Module):
    """``upsample``: ConvUpBlocks from LATENT_SIDE to LATENT_SIDE * 2**n (NPVA's
    GeomDecoder / ExprDecoder layout); ``channels`` = [Cin, C1, ..., Cn]."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.upsample = nn.Sequential(
            *[
                ConvUpBlock(channels[i], channels[i + 1], LATENT_SIDE * 2**i)
                for i in range(len(channels) - 1)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


def block_channels(n_blocks: int, cin: int, cout: int = 3) -> list[int]:
    """[cin, 64, 32, ..., cout]: halving from FIRST_CHANNELS, at least MIN_CHANNELS."""
    mid = [max(MIN_CHANNELS, FIRST_CHANNELS >> i) for i in range(n_blocks - 1)]
    return [cin, *mid, cout]


def latent_channels(z_dim: int) -> int:
    """Channels of the latent grid [Z / 64, 8, 8] (AvatarqError unless 64 divides Z)."""
    side = LATENT_SIDE * LATENT_SIDE
    if z_dim % side:
        raise AvatarqError(
            f"a pica decoder reads z as [Z/64, 8, 8]; z_dim {z_dim} is not a multiple of 64"
        )
    return z_dim // side


def geometry_size(tex_size: int) -> int:
    """Side G of the position map: a quarter of the texture (NPVA: 256 for 1024), >= 16."""
    return max(2 * LATENT_SIDE, tex_size // 4)


class PicaDecoder(nn.Module):
    """(z [B, Z], view [B, 3]) -> (texture [B, 3, T, T], mesh [B, 3V]), normalized units."""

    def __init__(self, z_dim: int, tex_size: int, n_vertices: int) -> None:
        super().__init__()
        self.c = latent_channels(z_dim)
        n_tex = int(math.log2(tex_size // LATENT_SIDE))
        n_geo = int(math.log2(geometry_size(tex_size) // LATENT_SIDE))
        self.texDecoder = Upsampler(block_channels(n_tex, self.c + 3))
        self.geomDecoder = Upsampler(block_channels(n_geo, self.c))
        self.register_buffer("vertex_uv", torch.full((n_vertices, 2), 0.5))

    def set_vertex_uv(self, uv: np.ndarray) -> None:
        """Texture coordinates (u, v) in [0, 1] of every vertex, float [V, 2]."""
        uv_t = torch.as_tensor(np.asarray(uv, np.float32))
        if tuple(uv_t.shape) != tuple(self.vertex_uv.shape):
            raise AvatarqError(
                f"vertex uvs must be {list(self.vertex_uv.shape)}, got {list(uv_t.shape)}"
            )
        with torch.no_grad():
            self.vertex_uv.copy_(uv_t)

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = z.shape[0]
        code = z.reshape(b, self.c, LATENT_SIDE, LATENT_SIDE)
        views = view[:, :, None, None].expand(b, 3, LATENT_SIDE, LATENT_SIDE)
        texture = self.texDecoder(torch.cat([code, views], 1))
        positions = self.geomDecoder(code)  # [B, 3, G, G]
        grid = (self.vertex_uv * 2.0 - 1.0)[None, None].expand(b, 1, -1, 2)
        mesh = F.grid_sample(positions, grid, mode="bilinear", align_corners=False)
        return texture, mesh[:, :, 0].transpose(1, 2).reshape(b, -1)


def vertex_uvs(
    vert_ids: np.ndarray, uv_ids: np.ndarray, uvs: np.ndarray, n_vertices: int
) -> np.ndarray:
    """Each vertex's (u, v): the texture coordinate of its first face corner, float32 [V, 2]
    (0.5, 0.5 for a vertex no face uses)."""
    out = np.full((n_vertices, 2), 0.5, np.float32)
    seen = np.zeros(n_vertices, bool)
    for v, t in zip(np.asarray(vert_ids).reshape(-1), np.asarray(uv_ids).reshape(-1), strict=True):
        if not seen[v]:
            out[v], seen[v] = uvs[t], True
    return out


@torch.no_grad()
def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Replace (in place) every `UntiedBiasConvBN` of ``module`` by an `UntiedBiasConv`
    computing the same in eval mode: W' = W s, b' = (b - mean) s + beta, s = gamma /
    sqrt(var + eps) per channel. Returns ``module``."""
    for name, child in list(module.named_modules()):
        if not isinstance(child, UntiedBiasConvBN):
            continue
        bn = child.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(child.conv.in_channels, child.conv.out_channels, 3, padding=1, bias=False)
        conv.weight.copy_(child.conv.weight * s[:, None, None, None])
        bias = (child.bias - bn.running_mean[:, None, None]) * s[:, None, None] + bn.bias[
            :, None, None
        ]
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, UntiedBiasConv(conv, bias.clone()))
    return module


_NPVA_BLOCK = re.compile(r"^upsample\.(\d+)\.conv1\.conv\.weight$")


def npva_upsampler(state: Mapping[str, torch.Tensor], prefix: str = "") -> Upsampler:
    """An `Upsampler` loaded from an NPVA state_dict (``geomDecoder.``, ``exprDecoder.`` or
    ``geomDisDecoder.`` of ``PiCADecoder``; pass that ``prefix``, a DDP ``module.`` too).

    Channels and block count come from the keys' shapes. NPVA's ``Conv2dBNUB`` subclasses
    ``nn.Conv2d`` and so also saves an unused ``upsample.N.conv1.weight`` (and ``.bias``
    is its untied bias); the unused weight is dropped, every other key must load exactly.

    Raises:
        AvatarqError: no blocks under ``prefix``, non-consecutive blocks, a missing or
            misshapen key.
    """
    bare = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    blocks = sorted(int(m.group(1)) for k in bare if (m := _NPVA_BLOCK.match(k)))
    if not blocks or blocks != list(range(len(blocks))):
        raise AvatarqError(f"no NPVA blocks 'upsample.N.conv1.conv.weight' under {prefix!r}")
    channels = [int(bare["upsample.0.conv1.conv.weight"].shape[1])]
    channels += [int(bare[f"upsample.{i}.conv1.conv.weight"].shape[0]) for i in blocks]
    model = Upsampler(channels)
    kept = {k: v for k, v in bare.items() if not re.match(r"^upsample\.\d+\.conv1\.weight$", k)}
    expected = model.state_dict()
    for key, value in kept.items():
        if key not in expected:
            raise AvatarqError(f"unexpected key {prefix}{key} for an NPVA decoder")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AvatarqError(
                f"key {prefix}{key} has shape {list(value.shape)}, expected {list(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(kept))
    if missing:
        raise AvatarqError(f"NPVA state_dict is missing {prefix}{missing[0]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in kept.items()})
    return model.eval()
