"""avatarq.runtime: the embedding API. Load a bundle, decode, render.

from avatarq.runtime import AvatarRuntime
with AvatarRuntime.open("dam.avq", backend="auto") as avatar:
    texture, vertices = avatar.decode(z, view)

The latent stream, with the bundle's codebook (``avatarq vq --bundle``):

    payload = pack_codes(avatar.encode_latents(z), avatar.codebook)     # sender
    texture, vertices = avatar.decode_codes(unpack_codes(payload, avatar.codebook), view)
"""

from avatarq.codec import Codebook, pack_codes, unpack_codes
from avatarq.runtime.avatar import AvatarRuntime
from avatarq.runtime.caching import CachingRuntime

__all__ = ["AvatarRuntime", "CachingRuntime", "Codebook", "pack_codes", "unpack_codes"]
