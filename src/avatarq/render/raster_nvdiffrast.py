"""nvdiffrast-backed rasterizer with the same interface as the torch reference backend.

``nvdiffrast`` ships on PyPI as ``diffrp-nvdiffrast`` (the ``nvdiffrast`` extra of avatarq,
nvdiffrast 0.3.3 sources); it compiles its CUDA plugin on first use, which needs nvcc,
ninja and a C++ compiler, and caches it under ~/.cache/torch_extensions. Nothing here
imports nvdiffrast until a backend object is created.
"""

from __future__ import annotations

import importlib.util

import torch

from avatarq.errors import AvatarqError
from avatarq.render.raster_torch import BOUNDARY_MODES

INSTALL_HINT = "pip install 'avatarq[nvdiffrast]' (the diffrp-nvdiffrast package)"


def nvdiffrast_available() -> bool:
    """True when CUDA is usable and the ``nvdiffrast`` module can be found (not imported)."""
    return torch.cuda.is_available() and importlib.util.find_spec("nvdiffrast") is not None


class NvdiffrastRaster:
    """rasterize / interpolate / texture / antialias through ``nvdiffrast.torch``.

    One ``RasterizeCudaContext`` is created per object, on ``device`` (default: the
    current CUDA device). Inputs on another device are copied to it; outputs stay there.

    Raises:
        AvatarqError: CUDA is unavailable, nvdiffrast is not installed, or its plugin
            cannot be built or loaded.
    """

    name = "nvdiffrast"

    def __init__(self, device: str | torch.device | None = None) -> None:
        if not torch.cuda.is_available():
            raise AvatarqError(
                "the nvdiffrast render backend needs CUDA, but torch.cuda.is_available() is "
                "False; use backend='torch' (the pure-torch reference rasterizer)"
            )
        try:
            import nvdiffrast.torch as dr
        except ImportError as exc:
            raise AvatarqError(
                f"nvdiffrast is not installed ({exc}); {INSTALL_HINT}, or use backend='torch'"
            ) from None
        self._dr = dr
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self._ctx = dr.RasterizeCudaContext(device=self.device)
        except Exception as exc:  # plugin JIT build or load failure: an environment problem
            raise AvatarqError(
                f"nvdiffrast could not build or load its CUDA plugin "
                f"({type(exc).__name__}: {exc}); it needs nvcc, ninja and a C++ compiler"
            ) from exc

    def _cuda(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(device=self.device, dtype=dtype).contiguous()

    def rasterize(
        self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]
    ) -> torch.Tensor:
        """float32 [B, H, W, 4] (u, v, z/w, triangle index + 1) for pos [B, V, 4], tri [F, 3]."""
        rast, _ = self._dr.rasterize(
            self._ctx,
            self._cuda(pos, torch.float32),
            self._cuda(tri, torch.int32),
            resolution=[int(resolution[0]), int(resolution[1])],
            grad_db=False,
        )
        return rast

    def interpolate(
        self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        """float32 [B, H, W, A] for attr [V, A] / [1, V, A] / [B, V, A] (2-D attr is broadcast)."""
        attr = self._cuda(attr, torch.float32)
        if attr.ndim == 2:
            attr = attr.unsqueeze(0)  # instanced rasterization needs [1, V, A] to broadcast
        out, _ = self._dr.interpolate(
            attr, self._cuda(rast, torch.float32), self._cuda(tri, torch.int32)
        )
        return out

    def texture(
        self, tex: torch.Tensor, uv: torch.Tensor, boundary_mode: str = "wrap"
    ) -> torch.Tensor:
        """Bilinear lookup ('linear' filter), float32 [B, H, W, C]."""
        if boundary_mode not in BOUNDARY_MODES:
            raise AvatarqError(
                f"boundary_mode must be one of {', '.join(BOUNDARY_MODES)}, got {boundary_mode!r}"
            )
        return self._dr.texture(
            self._cuda(tex, torch.float32),
            self._cuda(uv, torch.float32),
            filter_mode="linear",
            boundary_mode=boundary_mode,
        )

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        """nvdiffrast's analytic antialiasing of color [B, H, W, C] along silhouette edges."""
        return self._dr.antialias(
            self._cuda(color, torch.float32),
            self._cuda(rast, torch.float32),
            self._cuda(pos, torch.float32),
            self._cuda(tri, torch.int32),
        )
