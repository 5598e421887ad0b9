"""avatarq.codec: coding the latent stream a telepresence sender transmits every frame.

`Codebook` (residual, optionally product, vector quantization of z), `train_codebook`
(k-means on a capture's latent codes), `pack_codes` / `unpack_codes` (the bitstream).
numpy only; it imports no stage.
"""

from avatarq.codec.vq import (
    CODEBOOK_VERSION,
    Codebook,
    VQConfig,
    load_codebook,
    pack_codes,
    train_codebook,
    unpack_codes,
)

__all__ = [
    "CODEBOOK_VERSION",
    "Codebook",
    "VQConfig",
    "load_codebook",
    "pack_codes",
    "train_codebook",
    "unpack_codes",
]
