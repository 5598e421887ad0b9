"""avatarq.render: Multiface-style rendering of decoded avatars and POCA visibility masks.

Backends: a pure-torch reference rasterizer with nvdiffrast's conventions (any device) and
nvdiffrast itself (CUDA; imported only when an nvdiffrast backend is created).
"""

from avatarq.core.topology import Topology
from avatarq.render.renderer import (
    BACKENDS,
    CAPTURE_RESOLUTION,
    RenderConfig,
    Renderer,
    RenderOutput,
    project_to_clip,
    resolve_backend,
    visible_texels,
)

__all__ = [
    "BACKENDS",
    "CAPTURE_RESOLUTION",
    "RenderConfig",
    "RenderOutput",
    "Renderer",
    "Topology",
    "project_to_clip",
    "resolve_backend",
    "visible_texels",
]
