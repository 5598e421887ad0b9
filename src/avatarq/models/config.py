"""The configuration of a Multiface DAM and the size rules that derive layer shapes from it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from avatarq.errors import AvatarqError

#: The Multiface DAM variants; FAMILY_ARCHS adds the PiCA-style decoder (`avatarq.models.pica`).
ARCHS = ("base", "res", "non", "bilinear", "warp")
FAMILY_ARCHS = (*ARCHS, "pica")
CONFIG_VERSION = 1
#: Largest sizes accepted (Multiface publishes z 256, texture 1024, 7306 vertices, 40 cameras):
#: a checkpoint or option beyond them is a mistake, refused before anything is allocated.
MAX_TEX_SIZE = 4096
MAX_SIZES = {"z_dim": 65_536, "n_vertices": 10_000_000, "n_cams": 100_000}

# Channels of the texture decoder's deconvs at full size (8 deconvs, 4 -> 1024); smaller
# textures drop deconvs from the start of the tail (the first block keeps cin = chidden = z).
_TEX_DECODER_TAIL = (64, 64, 32, 32, 16, 16, 3)
# Warp field decoder: [256, 2, 2] -> 4 blocks -> [16, 512, 512] at Multiface's sizes (512 and
# 1024, then resized to T); smaller textures drop blocks from the start of the tail.
_WARP_TAIL = (128, 128, 128, 64, 64, 32, 32, 16)
_ENCODER_CHANNELS = (16, 32, 64, 128)


@dataclass(frozen=True)
class DAMConfig:
    """A Deep Appearance Model's sizes and variant.

    Attributes:
        arch: one of ``base``, ``res``, ``non``, ``bilinear``, ``warp`` (Multiface DAMs), or
            ``pica`` (a PiCA-style decoder, `avatarq.models.pica`, with the DAM's encoder).
        z_dim: latent size Z (256 in the published models).
        tex_size: texture side T in texels, a power of two >= 16 (1024 published).
        n_vertices: mesh vertex count V (7306 published); the mesh output has 3V floats.
        n_cams: number of capture cameras (colour-correction entries; camera 0 anchored).
        has_encoder: whether the checkpoint carries the encoder (``enc.*``).
    """

    arch: str = "base"
    z_dim: int = 256
    tex_size: int = 1024
    n_vertices: int = 7306
    n_cams: int = 40
    has_encoder: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.arch not in FAMILY_ARCHS:
            raise AvatarqError(
                f"unknown arch {self.arch!r}; expected one of {', '.join(FAMILY_ARCHS)}"
            )
        t = self.tex_size
        if (
            isinstance(t, bool)
            or not isinstance(t, int)
            or t < 16
            or t > MAX_TEX_SIZE
            or t & (t - 1)
        ):
            raise AvatarqError(f"tex_size must be a power of two in 16..{MAX_TEX_SIZE}, got {t!r}")
        for name, high in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise AvatarqError(f"{name} must be an integer in 1..{high}, got {value!r}")
        if self.arch == "pica" and self.z_dim % 64:
            raise AvatarqError(
                f"a pica decoder reads z as [Z/64, 8, 8] (NPVA: 256 = 4x8x8); z_dim {self.z_dim} "
                "is not a multiple of 64"
            )

    @property
    def mesh_size(self) -> int:
        return 3 * self.n_vertices

    @property
    def res(self) -> bool:
        return self.arch == "res"

    @property
    def non(self) -> bool:
        return self.arch == "non"

    @property
    def bilinear(self) -> bool:
        return self.arch == "bilinear"

    @property
    def base_size(self) -> int:
        """Side of the texture code grid: 4 when log2(T) is even, else 2 (Multiface: 512 -> 2)."""
        return 4 if int(math.log2(self.tex_size)) % 2 == 0 else 2

    @property
    def n_tex_blocks(self) -> int:
        return int(math.log2(self.tex_size // self.base_size)) // 2

    def tex_decoder_channels(self) -> list[int]:
        """Channel count at each stage of the texture decoder, input first, 3 last."""
        n_deconv = 2 * self.n_tex_blocks
        return [self.z_dim, self.z_dim, *_TEX_DECODER_TAIL[len(_TEX_DECODER_TAIL) - n_deconv + 1 :]]

    @property
    def n_warp_blocks(self) -> int:
        """ConvUpsample blocks of the warp decoder: 4 at T = 512 and 1024 (Multiface)."""
        return int(math.log2(self.tex_size // 2)) // 2

    @property
    def warp_field_size(self) -> int:
        """Side of the warp decoder's last block output (512 at T = 512 and 1024), resized to T."""
        return 2 * 4**self.n_warp_blocks

    def warp_channels(self) -> list[int]:
        n = 2 * self.n_warp_blocks
        return [256, *_WARP_TAIL[len(_WARP_TAIL) - n :]]

    @property
    def n_enc_blocks(self) -> int:
        return min(4, int(math.log2(self.tex_size // 2)) // 2)

    def encoder_channels(self) -> list[int]:
        return [3, *_ENCODER_CHANNELS[4 - self.n_enc_blocks :]]

    @property
    def encoder_features(self) -> int:
        side = self.tex_size // 4**self.n_enc_blocks
        return 128 * side * side

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> DAMConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise AvatarqError(
                f"DAM config version {known['version']} is not supported (expected {CONFIG_VERSION})"
            )
        return cls(**known)
