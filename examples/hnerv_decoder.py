"""A small HNeRV-like decoder that avatarq has never seen: bring-your-own-decoder example.

HNeRV (Chen et al., CVPR 2023) decodes a small embedding into an image with conv +
PixelShuffle blocks and GELU. This one decodes a latent ``z`` [B, Z] and a unit view
direction ``view`` [B, 3] into two outputs:

    rgb    float32 [B, 3, 4S, 4S]   the image (what avatarq's metrics judge)
    alpha  float32 [B, 1, 4S, 4S]   a coverage map in 0..1 (kept as a second output)

with S = ``base`` (the embedding's spatial size). Layers: Linear -> [C, S, S] -> 3x3 conv to
4C + PixelShuffle(2) + GroupNorm + GELU -> nearest Upsample x2 + 3x3 conv + GELU -> two
3x3 conv heads. Weights come from the factory (seeded), as a user's own code would load
them::

    avatarq export --model examples/hnerv_decoder.py:hnerv --input z:32 --input view:3 \\
        --texture-output rgb -o hnerv.avq
"""

from __future__ import annotations

import torch
from torch import nn


class HNeRVDecoder(nn.Module):
    """(z float32 [B, z_dim], view float32 [B, 3]) -> {"rgb": [B, 3, 4S, 4S], "alpha": [B, 1, 4S, 4S]}."""

    def __init__(self, z_dim: int = 32, channels: int = 16, base: int = 8) -> None:
        super().__init__()
        self.channels, self.base = channels, base
        self.stem = nn.Linear(z_dim + 3, channels * base * base)
        self.up1 = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 3, padding=1),
            nn.PixelShuffle(2),
            nn.GroupNorm(4, channels),
            nn.GELU(),
        )
        self.up2 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.GELU(),
        )
        self.rgb = nn.Conv2d(channels // 2, 3, 3, padding=1)
        self.alpha = nn.Conv2d(channels // 2, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(torch.cat([z, view], dim=1))
        x = x.view(z.shape[0], self.channels, self.base, self.base)
        x = self.up2(self.up1(x))
        return {"rgb": self.rgb(x), "alpha": torch.sigmoid(self.alpha(x))}


def hnerv(seed: int = 0) -> HNeRVDecoder:
    """The example decoder with seeded weights (z 32, 16 channels, 32x32 output)."""
    torch.manual_seed(seed)
    return HNeRVDecoder().eval()


def write_latents(path: str = "examples/hnerv_latents.npz", n_frames: int = 24) -> None:
    """A smooth latent clip for the example (z [T, 32], view [T, 3] within 20 degrees of the
    front): what ``--data`` and ``bench --sequence`` read by input name."""
    from avatarq.core.inputs import smooth_clip
    from avatarq.data.latents import save_inputs

    save_inputs(smooth_clip(32, n_frames, seed=3, cone_deg=20.0), path)


if __name__ == "__main__":
    write_latents()
