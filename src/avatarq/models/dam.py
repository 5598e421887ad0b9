"""The Multiface Deep Appearance Model family: encoder, decoder, warp field, colour correction.

Module and parameter names follow the public Multiface code so that its checkpoints
(``state_dict`` of a DistributedDataParallel model, keys ``module.enc.*``, ``module.dec.*``,
``module.cc.*``, ``module.warp.*``) load unchanged once the ``module.`` prefix is removed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatarq.models.config import DAMConfig
from avatarq.models.layers import (
    LEAKY_SLOPE,
    ConvDownsample,
    ConvUpsample,
    LinearWN,
)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class TextureDecoder(nn.Module):
    """[B, Z * s * s] -> texture [B, 3, T, T], s = config.base_size; no activation at the end."""

    def __init__(self, config: DAMConfig) -> None:
        super().__init__()
        self.z_dim = config.z_dim
        self.base = config.base_size
        ch = config.tex_decoder_channels()
        n = config.n_tex_blocks
        self.upsample = nn.Sequential(
            *[
                ConvUpsample(
                    ch[2 * i],
                    ch[2 * i + 1],
                    ch[2 * i + 2],
                    self.base * 4**i,
                    no_activ=(i == n - 1),
                    res=config.res,
                    bilinear=config.bilinear,
                    non=config.non,
                )
                for i in range(n)
            ]
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.upsample(code.view(-1, self.z_dim, self.base, self.base))


class DeepAppearanceDecoder(nn.Module):
    """(z [B, Z], view [B, 3]) -> (texture [B, 3, T, T], mesh [B, 3V]), both normalized."""

    def __init__(self, config: DAMConfig) -> None:
        super().__init__()
        self.texture_decoder = TextureDecoder(config)
        self.view_fc = LinearWN(3, 8)
        self.z_fc = LinearWN(config.z_dim, 256)
        self.mesh_fc = LinearWN(256, config.mesh_size)
        self.texture_fc = LinearWN(256 + 8, config.z_dim * config.base_size**2)

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view_code = _lrelu(self.view_fc(view))
        z_code = _lrelu(self.z_fc(z))
        texture_code = _lrelu(self.texture_fc(torch.cat((view_code, z_code), 1)))
        return self.texture_decoder(texture_code), self.mesh_fc(z_code)


class WarpFieldDecoder(nn.Module):
    """Multiface's warp field: resamples the decoded texture at a z-dependent grid.

    ``forward(z [B, Z], texture [B, C, T, T]) -> warped texture [B, C, T, T]``.

    Layout (the checkpoint's keys): ``mlp`` = LinearWN(Z, 256), LReLU, LinearWN(256, 1024),
    LReLU -> [B, 256, 2, 2]; ``upsample`` = n ConvUpsample blocks (2 -> 2 * 4**n, LReLU after
    every block), then ``nn.Upsample(size=T, mode="bilinear")`` (no parameters), then a plain
    ``nn.Conv2d(C, 2, 3, 1, 1)`` at index n + 1 (``upsample.5`` at Multiface's sizes 512 and
    1024, where n = 4); ``normal_grid`` is a float32 buffer [1, 2, T, T] saved with the weights.

    The sampling grid is ``upsample(...) / T + normal_grid`` (channel 0 = x, 1 = y, in
    grid_sample's [-1, 1] units), sampled bilinearly with zero padding and
    ``align_corners=False``, exactly as Multiface calls ``F.grid_sample`` with its defaults.
    Note that ``normal_grid`` spans [-1, 1] end to end (texel centres under
    align_corners=True), so even a zero field is not the identity: texel j is read at
    j * T / (T - 1) - 0.5 texels and the outermost half texel fades toward zero.
    """

    def __init__(self, config: DAMConfig) -> None:
        super().__init__()
        self.tex_size = config.tex_size
        self.n_blocks = config.n_warp_blocks
        self.mlp = nn.Sequential(
            LinearWN(config.z_dim, 256),
            nn.LeakyReLU(LEAKY_SLOPE),
            LinearWN(256, 1024),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        ch = config.warp_channels()
        self.upsample = nn.Sequential(
            *[
                ConvUpsample(ch[2 * i], ch[2 * i + 1], ch[2 * i + 2], 2 * 4**i)
                for i in range(self.n_blocks)
            ],
            nn.Upsample(size=config.tex_size, mode="bilinear"),
            nn.Conv2d(ch[-1], 2, 3, 1, 1),
        )
        self.register_buffer("normal_grid", normal_grid(config.tex_size))

    def field(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, Z] -> warp field [B, 2, T, T] in grid units (before ``normal_grid``)."""
        h = self.upsample[: self.n_blocks](self.mlp(z).view(-1, 256, 2, 2))
        if h.shape[-1] != self.tex_size:
            # At equal sizes the bilinear resize is the identity; skipping it keeps the
            # exported graph free of a no-op Resize (Multiface at 512).
            h = self.upsample[self.n_blocks](h)
        return self.upsample[self.n_blocks + 1](h) / self.tex_size

    def grid(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, Z] -> sampling grid float32 [B, T, T, 2] (x, y) for ``F.grid_sample``."""
        return (self.field(z).float() + self.normal_grid).permute(0, 2, 3, 1)

    def forward(self, z: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
        # The grid and the sampling run in float32 even inside a float16 decoder (see _apply).
        warped = F.grid_sample(
            texture.float(),
            self.grid(z),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        return warped.to(texture.dtype)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> WarpFieldDecoder:
        """Move ``normal_grid`` with the layers but keep it float32 under ``.half()`` and
        ``.to(float16)``: float16 values near +-1 are 2**-11 apart, so rounding the grid would
        move a texel by up to T / 8192 texels (1/8 texel at T = 1024)."""
        grid = self._buffers.pop("normal_grid")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["normal_grid"] = grid
        self._buffers["normal_grid"] = grid.to(self.upsample[-1].weight.device)
        return self


def normal_grid(size: int) -> torch.Tensor:
    """Multiface's base grid: float32 [1, 2, T, T], channel 0 = x (varies along columns),
    channel 1 = y (varies along rows), both ``np.linspace(-1, 1, T)`` cast to float32."""
    line = np.linspace(-1.0, 1.0, size)
    x, y = np.meshgrid(line, line)
    return torch.from_numpy(np.stack((x, y))[None].astype(np.float32))


class ColorCorrection(nn.Module):
    """Per-camera gain and bias on the texture; camera 0 is anchored to gain 1, bias 0."""

    def __init__(self, n_cams: int) -> None:
        super().__init__()
        self.weight_anchor = nn.Parameter(torch.ones(1, 3, 1, 1), requires_grad=False)
        self.bias_anchor = nn.Parameter(torch.zeros(1, 3, 1, 1), requires_grad=False)
        self.weight = nn.Parameter(torch.ones(n_cams - 1, 3, 1, 1))
        self.bias = nn.Parameter(torch.zeros(n_cams - 1, 3, 1, 1))

    def gain_bias(self, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cams int64 [B] -> gain [B, 3, 1, 1], bias [B, 3, 1, 1]."""
        weights = torch.cat([self.weight_anchor, self.weight], 0)
        biases = torch.cat([self.bias_anchor, self.bias], 0)
        return weights[cams], biases[cams]

    def forward(self, texture: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        gain, bias = self.gain_bias(cams)
        return texture * gain + bias


class DeepAppearanceEncoder(nn.Module):
    """(texture [B, 3, T, T], mesh [B, 3V]) -> (mu [B, Z], logstd [B, Z]), both UNscaled.

    Multiface scales them afterwards: mu * 0.1, logstd * 0.01 (see `DeepAppearanceModel.encode`).
    """

    def __init__(self, config: DAMConfig) -> None:
        super().__init__()
        self.z_dim = config.z_dim
        ch = config.encoder_channels()
        self.texture_encoder = nn.Module()
        self.texture_encoder.downsample = nn.Sequential(
            *[
                ConvDownsample(ch[i], ch[i + 1], ch[i + 1], res=config.res)
                for i in range(len(ch) - 1)
            ]
        )
        self.texture_fc = LinearWN(config.encoder_features, 256)
        self.mesh_fc = LinearWN(config.mesh_size, 256)
        self.fc = LinearWN(512, 2 * config.z_dim)

    def forward(
        self, texture: torch.Tensor, mesh: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.texture_encoder.downsample(texture).flatten(1)
        tex_feat = _lrelu(self.texture_fc(feat))
        mesh_feat = _lrelu(self.mesh_fc(mesh))
        latent = self.fc(torch.cat((tex_feat, mesh_feat), -1))
        return latent[:, : self.z_dim], latent[:, self.z_dim :]


class DeepAppearanceModel(nn.Module):
    """The trainable model with Multiface's layout: ``enc``, ``dec``, ``cc`` and (warp) ``warp``.

    ``forward(avgtex [B,3,T,T], mesh [B,V,3], view [B,3], cams [B] | None, sample=True)``
    returns (texture [B,3,T,T], mesh [B,V,3], kl scalar), all in normalized units.
    """

    def __init__(self, config: DAMConfig) -> None:
        super().__init__()
        self.config = config
        if config.has_encoder:
            self.enc = DeepAppearanceEncoder(config)
        if config.arch == "pica":
            from avatarq.models.pica import PicaDecoder

            self.dec: nn.Module = PicaDecoder(config.z_dim, config.tex_size, config.n_vertices)
        else:
            self.dec = DeepAppearanceDecoder(config)
        self.cc = ColorCorrection(config.n_cams)
        if config.arch == "warp":
            self.warp = WarpFieldDecoder(config)

    def encode(self, avgtex: torch.Tensor, mesh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mu [B, Z], logstd [B, Z]) with Multiface's 0.1 / 0.01 scaling applied."""
        mean, logstd = self.enc(avgtex, mesh.flatten(1))
        return mean * 0.1, logstd * 0.01

    def decode(
        self, z: torch.Tensor, view: torch.Tensor, cams: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B,Z], view [B,3]) -> (texture [B,3,T,T], mesh [B,V,3]), normalized units.

        As in Multiface, the warp (``warp`` arch) resamples the decoded texture first and the
        colour correction of ``cams`` (int64 [B]) applies to the warped texture.
        """
        texture, mesh = self.dec(z, view)
        if self.config.arch == "warp":
            texture = self.warp(z, texture)
        if cams is not None:
            texture = self.cc(texture, cams)
        return texture, mesh.view(z.shape[0], -1, 3)

    def forward(
        self,
        avgtex: torch.Tensor,
        mesh: torch.Tensor,
        view: torch.Tensor,
        cams: torch.Tensor | None = None,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logstd = self.encode(avgtex, mesh)
        kl = 0.5 * torch.mean(torch.exp(2 * logstd) + mean**2 - 1.0 - 2 * logstd)
        z = mean + torch.exp(logstd) * torch.randn_like(mean) if sample else mean
        texture, pred_mesh = self.decode(z, view, cams)
        return texture, pred_mesh, kl


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
