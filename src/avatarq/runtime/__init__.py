"""avatarq.runtime: the embedding API. Load a bundle, decode, render.

from avatarq.runtime import AvatarRuntime
with AvatarRuntime.open("dam.avq", backend="auto") as avatar:
    texture, vertices = avatar.decode(z, view)
"""

from avatarq.runtime.avatar import AvatarRuntime
from avatarq.runtime.caching import CachingRuntime

__all__ = ["AvatarRuntime", "CachingRuntime"]
