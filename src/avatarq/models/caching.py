"""Neural-Caching low-latency mode for the Multiface DAM decoder (Yu et al., WACV 2023).

Two networks replace one full decode per frame:

- the **cache network** (`CacheNetwork`) is the full deployable decoder run on a reference
  frame r. Besides the frame's texture [B, 3, T, T] and vertices [B, V, 3] it emits the
  features of the texture decoder after ``cache_blocks`` of its x4 upsampling blocks,
  ``features`` [B, C, T / 4^(n - k), T / 4^(n - k)] (k = ``cache_blocks``, n = the decoder's
  block count; the default k = n - 1 caches at T / 4, the paper's default resolution);
- the **warp network** (`WarpNetwork`) produces frame t > r from that cache: an MLP codes
  (z_t, z_t - z_r, view_t, view_t - view_r) into ``code_dim`` channels broadcast over the
  cached features; a 1x1 and a 3x3 conv mix them, ``up_stages`` up-convolutions (ReLU,
  bilinear x2, 3x3 conv, channels halving) refine, and a 3x3 conv predicts the change of
  the normalized texture at that resolution, bilinearly resized to T and added to the
  cached texture of frame r (the cached full-resolution skip). The DAM decoder is light
  (about 45 MMAC at T = 256), so the warp network stays at low resolution to be cheaper
  than what it replaces: with the defaults about 10 MMAC at T = 256. The vertices come
  from the decoder's own mesh branch (z_fc -> mesh_fc, two small Linear layers copied
  from the decoder), so the mesh of a warped frame is exactly the full decoder's.

Both work in the bundle's units: with normalization folded in, textures in 0..255 and
vertices in capture units; the warp network keeps the decoder's texture gain and offset
as buffers so that its residual is learned in normalized units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avatarq.core.documents import known_fields
from avatarq.errors import AvatarqError
from avatarq.models.deploy import DeployableDecoder
from avatarq.models.layers import LEAKY_SLOPE

WARP_CONFIG_VERSION = 1
MAX_WIDTH = 512


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


@dataclass(frozen=True)
class WarpConfig:
    """The shape of a warp network.

    Attributes:
        cache_blocks: texture-decoder blocks the cache keeps (1 .. n - 1); None = n - 1
            (features at T / 4).
        width: channels of the first convs; each up-stage halves them (at least 4).
        up_stages: up-convolutions before the output conv (0 .. log2(T / h)); the change
            is predicted at h * 2^up_stages and resized to T.
        code_dim: channels of the pose/expression code broadcast over the features.
        mlp_hidden: hidden units of the code MLP.
        version: schema version of the config.
    """

    cache_blocks: int | None = None
    width: int = 8
    up_stages: int = 1
    code_dim: int = 16
    mlp_hidden: int = 64
    version: int = WARP_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != WARP_CONFIG_VERSION:
            raise AvatarqError(
                f"warp config version {self.version!r} is not supported (expected "
                f"{WARP_CONFIG_VERSION})"
            )
        for name in ("width", "code_dim", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WIDTH:
                raise AvatarqError(
                    f"warp {name} must be an integer in 1..{MAX_WIDTH}, got {value!r}"
                )
        u = self.up_stages
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u <= 12:
            raise AvatarqError(f"warp up_stages must be an integer in 0..12, got {u!r}")
        c = self.cache_blocks
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise AvatarqError(f"cache_blocks must be an integer >= 1, got {c!r}")

    def resolved_blocks(self, n_blocks: int) -> int:
        """The cache block count for a decoder of ``n_blocks`` x4 blocks (AvatarqError when
        the decoder has none to spare)."""
        if n_blocks < 2:
            raise AvatarqError(
                f"the decoder has {n_blocks} upsampling block(s); caching needs at least 2 "
                "(a texture of at least 64 texels)"
            )
        k = n_blocks - 1 if self.cache_blocks is None else self.cache_blocks
        if not 1 <= k <= n_blocks - 1:
            raise AvatarqError(
                f"cache_blocks must be in 1..{n_blocks - 1} for this decoder, got {k}"
            )
        return k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WarpConfig:
        return cls(**known_fields(cls, data, "warp config field"))


class CacheNetwork(nn.Module):
    """(z [B, Z], view [B, 3]) -> (texture [B, 3, T, T], vertices [B, V, 3], features
    [B, C, h, h]): the deployable decoder with the features of block ``cache_blocks``.

    Module names are the decoder's (``dec.texture_decoder.upsample.0.conv1.deconv`` ...), so
    a calibration of the decoder applies to this graph unchanged.
    """

    def __init__(self, decoder: DeployableDecoder, cache_blocks: int) -> None:
        super().__init__()
        n = decoder.config.n_tex_blocks
        if not 1 <= cache_blocks <= n - 1:
            raise AvatarqError(f"cache_blocks must be in 1..{n - 1}, got {cache_blocks}")
        self.config = decoder.config
        self.cache_blocks = cache_blocks
        self.dec = decoder.dec
        self.warp = decoder.warp
        for name in ("tex_gain", "tex_offset", "vert_scale", "vert_offset"):
            self.register_buffer(name, getattr(decoder, name).clone())
        self.denormalized = decoder.denormalized
        self.eval()

    @property
    def declaration(self):  # -> avatarq.models.declaration.DecoderDeclaration
        """Inputs z [Z], view [3]; outputs texture, vertices (a mesh) and features."""
        from avatarq.models.declaration import DecoderDeclaration, InputSpec

        c = self.config
        side = self.feature_size
        return DecoderDeclaration(
            c.arch,
            (InputSpec("z", (c.z_dim,)), InputSpec("view", (3,))),
            ("texture", "vertices", "features"),
            ((3, c.tex_size, c.tex_size), (c.n_vertices, 3), (self.feature_channels, side, side)),
            mesh=True,
            texture_output="texture",
            mesh_output="vertices",
        )

    @property
    def feature_channels(self) -> int:
        return self.config.tex_decoder_channels()[2 * self.cache_blocks]

    @property
    def feature_size(self) -> int:
        return self.config.base_size * 4**self.cache_blocks

    def forward(
        self, z: torch.Tensor, view: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dec = self.dec
        view_code = _lrelu(dec.view_fc(view))
        z_code = _lrelu(dec.z_fc(z))
        code = _lrelu(dec.texture_fc(torch.cat((view_code, z_code), 1)))
        blocks = dec.texture_decoder.upsample
        h = code.view(-1, self.config.z_dim, self.config.base_size, self.config.base_size)
        features = blocks[: self.cache_blocks](h)
        texture = blocks[self.cache_blocks :](features)
        if self.warp is not None:
            texture = self.warp(z, texture)
        texture = texture * self.tex_gain + self.tex_offset
        vertices = dec.mesh_fc(z_code).view(z.shape[0], -1, 3) * self.vert_scale + self.vert_offset
        return texture, vertices, features


class WarpNetwork(nn.Module):
    """(features [B, C, h, h], texture_ref [B, 3, T, T], z_ref [B, Z], view_ref [B, 3],
    z [B, Z], view [B, 3]) -> (texture [B, 3, T, T], vertices [B, V, 3]).

    ``features`` and ``texture_ref`` are the cache network's outputs for (z_ref, view_ref);
    the result approximates the full decoder at (z, view). Units as the cache network's.
    """

    def __init__(self, cache: CacheNetwork, config: WarpConfig) -> None:
        super().__init__()
        c = cache.config
        self.config = config
        self.z_dim = c.z_dim
        self.cache_blocks = cache.cache_blocks
        self.feature_channels = cache.feature_channels
        self.feature_size = cache.feature_size
        self.tex_size = c.tex_size
        n_stages = int(math.log2(c.tex_size // cache.feature_size))
        if config.up_stages > n_stages:
            raise AvatarqError(
                f"warp up_stages must be at most {n_stages} for features at {cache.feature_size} "
                f"and a texture of {c.tex_size}, got {config.up_stages}"
            )
        self.mlp = nn.Sequential(
            nn.Linear(2 * c.z_dim + 6, config.mlp_hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(config.mlp_hidden, config.code_dim),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        widths = [max(4, config.width >> i) for i in range(config.up_stages + 1)]
        self.conv_in = nn.Conv2d(self.feature_channels + config.code_dim, widths[0], 1)
        self.conv_mix = nn.Conv2d(widths[0], widths[0], 3, 1, 1)
        self.stages = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1) for i in range(config.up_stages)
        )
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, 1, 1)
        with torch.no_grad():  # start as the identity: frame t = cached frame r
            self.conv_out.weight.zero_()
            self.conv_out.bias.zero_()
        # The decoder's mesh branch, exact: vertices do not depend on the cache.
        self.z_fc = _copy_linear(cache.dec.z_fc)
        self.mesh_fc = _copy_linear(cache.dec.mesh_fc)
        for name in ("tex_gain", "vert_scale", "vert_offset"):
            self.register_buffer(name, getattr(cache, name).clone())

    def forward(
        self,
        features: torch.Tensor,
        texture_ref: torch.Tensor,
        z_ref: torch.Tensor,
        view_ref: torch.Tensor,
        z: torch.Tensor,
        view: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pose = torch.cat((z, z - z_ref, view, view - view_ref), 1)
        code = self.mlp(pose)[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        x = _lrelu(self.conv_in(torch.cat((features, code), 1)))
        x = self.conv_mix(x)
        for conv in self.stages:
            x = F.interpolate(F.relu(x), scale_factor=2.0, mode="bilinear", align_corners=False)
            x = conv(x)
        delta = self.conv_out(F.relu(x))
        if delta.shape[-1] != self.tex_size:
            delta = F.interpolate(
                delta, size=(self.tex_size,) * 2, mode="bilinear", align_corners=False
            )
        texture = texture_ref + delta * self.tex_gain
        vertices = self.mesh_fc(_lrelu(self.z_fc(z))).view(z.shape[0], -1, 3)
        return texture, vertices * self.vert_scale + self.vert_offset


def _copy_linear(layer: nn.Module) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        out.weight.copy_(layer.weight)
        out.bias.copy_(layer.bias)
    out.weight.requires_grad_(False)
    out.bias.requires_grad_(False)
    return out


def warp_parameters(warp: WarpNetwork) -> list[nn.Parameter]:
    """The trainable parameters (the mesh branch is the decoder's and stays fixed)."""
    return [p for p in warp.parameters() if p.requires_grad]


def count_macs(cache: CacheNetwork, warp: WarpNetwork) -> dict[str, int]:
    """Multiply-adds per frame (batch 1) of the Conv, ConvTranspose and Linear layers:
    ``full`` (the cache network: the whole decoder) and ``warp``."""

    def macs(module: nn.Module, run) -> int:  # noqa: ANN001
        total = [0]

        def hook(m: nn.Module, inputs, output) -> None:  # noqa: ANN001
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                total[0] += output.numel() * k
            elif isinstance(m, nn.ConvTranspose2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                total[0] += inputs[0].numel() * k
            elif isinstance(m, nn.Linear):
                total[0] += output.numel() * m.in_features

        handles = [
            m.register_forward_hook(hook)
            for m in module.modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
        ]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        return total[0]

    z = torch.zeros(1, cache.config.z_dim)
    view = torch.tensor([[0.0, 0.0, 1.0]])
    with torch.no_grad():
        texture, _, features = cache(z, view)
    return {
        "full": macs(cache, lambda: cache(z, view)),
        "warp": macs(warp, lambda: warp(features, texture, z, view, z, view)),
    }
