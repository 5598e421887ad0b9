"""The render stage: a decoded avatar on screen as Multiface renders it, and POCA's texel
visibility mask.

Multiface's convention (``utils.Renderer.render`` in facebookresearch/multiface), which the
default configuration reproduces so that numbers compare with published ones:

    p = M [v; 1]                      M: [3, 4] pixel projection, v: head-local vertex
    x = (p_x / (W / 2) - p_z) / p_z   i.e. u / (W / 2) - 1 with u = p_x / p_z (pixels)
    y = (p_y / (H / 2) - p_z) / p_z   i.e. v / (H / 2) - 1, no flip: row 0 is v in [0, 1)
    z = p_z / max(p_z)                max over the image's vertices; nearer is smaller
    w = 1                             so interpolation is screen-affine

then rasterize(pos, vert_ids, (H, W)), interpolate(uvs, rast, uv_ids), texture(tex,
linear filter, wrap boundary), times clamp(rast[..., 3], 0, 1). Image rows therefore match
the rows of the capture photo.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from avatarq.core.documents import known_fields
from avatarq.core.topology import Topology
from avatarq.errors import AvatarqError
from avatarq.render.raster_nvdiffrast import INSTALL_HINT, NvdiffrastRaster, nvdiffrast_available
from avatarq.render.raster_torch import TorchRaster

RENDER_CONFIG_VERSION = 1
CAPTURE_RESOLUTION = (2048, 1334)
"""(H, W) of Multiface captures."""


class RasterBackend(Protocol):
    """What a render backend offers (see raster_torch / raster_nvdiffrast)."""

    name: str

    def rasterize(
        self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]
    ) -> torch.Tensor: ...

    def interpolate(
        self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor: ...

    def texture(
        self, tex: torch.Tensor, uv: torch.Tensor, boundary_mode: str = "wrap"
    ) -> torch.Tensor: ...

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor: ...


_BACKENDS: dict[str, type] = {"torch": TorchRaster, "nvdiffrast": NvdiffrastRaster}
BACKENDS = tuple(_BACKENDS)
"""Backend names; a config may also say 'auto'."""


def resolve_backend(name: str) -> str:
    """The backend 'auto' stands for here ('nvdiffrast' when CUDA and nvdiffrast are
    present, else 'torch'); other names are returned unchanged after validation."""
    if name == "auto":
        return "nvdiffrast" if nvdiffrast_available() else "torch"
    if name not in _BACKENDS:
        raise AvatarqError(f"unknown render backend {name!r}; expected auto, {', '.join(BACKENDS)}")
    return name


@dataclass(frozen=True)
class RenderConfig:
    """How to render.

    Attributes:
        resolution: (H, W) of the rendered image in pixels; Multiface captures are
            (2048, 1334).
        backend: 'torch' (pure-torch reference, any device), 'nvdiffrast' (CUDA) or 'auto'
            (nvdiffrast when available, else torch).
        perspective_correct: False (default) renders with w = 1 as Multiface does, so
            attributes are interpolated affinely in screen space; True uses w = p_z for
            perspective-correct interpolation and depth z/w = 1 - c / p_z, c = half the
            smallest positive p_z of the image (z/w in [0.5, 1) for visible vertices).
        antialias: apply nvdiffrast's analytic antialiasing to image and mask (nvdiffrast
            backend only).
        version: config schema version.
    """

    resolution: tuple[int, int] = CAPTURE_RESOLUTION
    backend: str = "auto"
    perspective_correct: bool = False
    antialias: bool = False
    version: int = RENDER_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != RENDER_CONFIG_VERSION:
            raise AvatarqError(
                f"render config version {self.version} is not supported "
                f"(expected {RENDER_CONFIG_VERSION})"
            )
        res = self.resolution
        if (
            not isinstance(res, (tuple, list))
            or len(res) != 2
            or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in res)
            or not all(1 <= r <= 32768 for r in res)
        ):
            raise AvatarqError(
                f"render resolution must be (H, W) with integers in [1, 32768], got {res!r}"
            )
        object.__setattr__(self, "resolution", (int(res[0]), int(res[1])))
        if self.backend != "auto" and self.backend not in _BACKENDS:
            raise AvatarqError(
                f"unknown render backend {self.backend!r}; expected auto, {', '.join(BACKENDS)}"
            )
        for name in ("perspective_correct", "antialias"):
            if not isinstance(getattr(self, name), bool):
                raise AvatarqError(
                    f"render {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.antialias and self.backend == "torch":
            raise AvatarqError(
                "antialias=True needs the nvdiffrast backend; the torch reference rasterizer "
                "has no antialiasing (use backend='nvdiffrast' or antialias=False)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resolution"] = list(self.resolution)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RenderConfig:
        data = known_fields(cls, data, "render config key")
        if "resolution" in data and isinstance(data["resolution"], list):
            data["resolution"] = tuple(data["resolution"])
        return cls(**data)


@dataclass(frozen=True)
class RenderOutput:
    """A rendered batch.

    Attributes:
        image: float32 [B, H, W, 3], the texture's values (scale unchanged) where the mesh
            covers the pixel centre, 0 elsewhere. Row 0 is the top row of the camera image.
        mask: float32 [B, H, W] in [0, 1]: 1 where covered, 0 elsewhere (fractional along
            silhouettes only with antialias).
    """

    image: torch.Tensor
    mask: torch.Tensor


def project_to_clip(
    vertices: torch.Tensor,
    M: torch.Tensor,
    resolution: tuple[int, int],
    perspective_correct: bool = False,
) -> torch.Tensor:
    """Clip-space positions of head-local vertices under a pixel projection, as Multiface.

    Args:
        vertices: float [B, V, 3] head-local vertex positions.
        M: float [B, 3, 4] projection to pixels, K [R_C R_f | R_C t_f + t_C].
        resolution: (H, W) in pixels.
        perspective_correct: see `RenderConfig.perspective_correct`.

    Returns:
        float32 [B, V, 4] (x, y, z, w) for the rasterizer.
    """
    height, width = resolution
    v = vertices.to(torch.float32)
    ones = torch.ones(v.shape[:2] + (1,), dtype=torch.float32, device=v.device)
    projected = torch.bmm(M.to(torch.float32), torch.cat([v, ones], -1).permute(0, 2, 1))
    px, py, pz = projected.permute(0, 2, 1).unbind(-1)
    if not perspective_correct:
        x = (px / (width / 2) - pz) / pz
        y = (py / (height / 2) - pz) / pz
        z = pz / torch.max(pz, 1, keepdim=True).values
        w = ones[..., 0]
    else:
        x = px / (width / 2) - pz
        y = py / (height / 2) - pz
        nearest = torch.where(pz > 0, pz, torch.full_like(pz, float("inf"))).amin(1, keepdim=True)
        c = 0.5 * torch.where(torch.isfinite(nearest), nearest, torch.ones_like(nearest))
        z = pz - c
        w = pz
    return torch.stack([x, y, z, w], dim=-1).contiguous()


class Renderer:
    """Renders decoded avatars with one topology and one configuration.

    Args:
        topology: triangles and UV atlas of the mesh.
        config: resolution, backend and modes (default: Multiface's capture setting).

    The backend is chosen once ('auto' resolved here); an nvdiffrast backend owns one
    ``RasterizeCudaContext``. The torch backend computes on the inputs' device, the
    nvdiffrast backend on its CUDA device (inputs are copied there); outputs stay where
    they were computed.
    """

    def __init__(self, topology: Topology, config: RenderConfig | None = None) -> None:
        if not isinstance(topology, Topology):
            raise AvatarqError(f"topology must be a Topology, got {type(topology).__name__}")
        self.topology = topology
        self.config = config if config is not None else RenderConfig()
        self.backend = resolve_backend(self.config.backend)
        if self.config.antialias and self.backend != "nvdiffrast":
            raise AvatarqError(
                f"antialias=True needs the nvdiffrast backend, but backend "
                f"{self.config.backend!r} resolved to {self.backend!r} here (no CUDA or no "
                f"nvdiffrast: {INSTALL_HINT}); set antialias=False"
            )
        self._raster: RasterBackend = _BACKENDS[self.backend]()
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def resolution(self) -> tuple[int, int]:
        return self.config.resolution

    def render(
        self, vertices: torch.Tensor, texture: torch.Tensor, M: torch.Tensor
    ) -> RenderOutput:
        """Render textured meshes.

        Args:
            vertices: float [B, V, 3] head-local vertex positions (V >= the topology's).
            texture: float [B, 3, Ht, Wt] in Multiface's on-load orientation (flipped
                vertically from the PNG, so tensor row 0 is v = 0); any value range.
            M: float [B, 3, 4] pixel projection per image.

        Returns:
            `RenderOutput` with image [B, H, W, 3] and mask [B, H, W].
        """
        self._check(vertices, M)
        if (
            not isinstance(texture, torch.Tensor)
            or texture.ndim != 4
            or texture.shape[1] != 3
            or not texture.is_floating_point()
        ):
            raise AvatarqError(
                f"texture must be a float tensor [B, 3, T, T], got {_describe(texture)}"
            )
        if texture.shape[0] != vertices.shape[0]:
            raise AvatarqError(
                f"texture batch size {texture.shape[0]} does not match vertices batch size "
                f"{vertices.shape[0]}"
            )
        rast, pos = self._rasterize(vertices, M)
        _, uv_ids, uvs = self._topology_tensors(rast.device)
        texc = self._raster.interpolate(uvs, rast, uv_ids)
        tex = texture.to(device=rast.device, dtype=torch.float32).permute(0, 2, 3, 1).contiguous()
        color = self._raster.texture(tex, texc, "wrap")
        mask = rast[..., 3].clamp(0.0, 1.0)
        image = color * mask.unsqueeze(-1)
        if self.config.antialias:
            vert_ids = self._topology_tensors(rast.device)[0]
            both = self._raster.antialias(
                torch.cat([image, mask.unsqueeze(-1)], -1), rast, pos, vert_ids
            )
            image, mask = both[..., :3].contiguous(), both[..., 3].contiguous()
        return RenderOutput(image=image, mask=mask)

    def rasterize(self, vertices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """float32 [B, H, W, 4] rasterizer output (u, v, z/w, triangle index + 1)."""
        self._check(vertices, M)
        return self._rasterize(vertices, M)[0]

    def visible_texels(
        self, vertices: torch.Tensor, M: torch.Tensor, tex_size: int
    ) -> torch.Tensor:
        """POCA's visibility mask: texels that some covered pixel samples.

        Every pixel whose centre the mesh covers contributes the texel
        (row, col) = (min(round(v (T - 1)), T - 1), min(round(u (T - 1)), T - 1)) of its
        interpolated UV (u, v), clamped at 0 too, in the on-load texture tensor orientation
        (row index from v).

        Args:
            vertices: float [B, V, 3]; M: float [B, 3, 4]; tex_size: texture side T.

        Returns:
            bool [B, T, T].
        """
        if not isinstance(tex_size, int) or isinstance(tex_size, bool) or tex_size < 1:
            raise AvatarqError(f"tex_size must be a positive integer, got {tex_size!r}")
        self._check(vertices, M)
        rast, _ = self._rasterize(vertices, M)
        _, uv_ids, uvs = self._topology_tensors(rast.device)
        texc = self._raster.interpolate(uvs, rast, uv_ids)
        batch = rast.shape[0]
        covered = (rast[..., 3] > 0).reshape(batch, -1)
        mask = torch.zeros(batch * tex_size * tex_size, dtype=torch.bool, device=rast.device)
        scale = float(tex_size - 1)
        for b in range(batch):
            idx = torch.nonzero(covered[b]).squeeze(1)
            uv = texc[b].reshape(-1, 2).index_select(0, idx)
            col = torch.round(uv[:, 0] * scale).clamp(0, tex_size - 1).to(torch.int64)
            row = torch.round(uv[:, 1] * scale).clamp(0, tex_size - 1).to(torch.int64)
            mask.index_fill_(0, (b * tex_size + row) * tex_size + col, True)
        return mask.view(batch, tex_size, tex_size)

    # ----------------------------------------------------------------------------------

    def _check(self, vertices: torch.Tensor, M: torch.Tensor) -> None:
        if (
            not isinstance(vertices, torch.Tensor)
            or vertices.ndim != 3
            or vertices.shape[-1] != 3
            or not vertices.is_floating_point()
        ):
            raise AvatarqError(
                f"vertices must be a float tensor [B, V, 3], got {_describe(vertices)}"
            )
        if vertices.shape[0] < 1:
            raise AvatarqError("vertices must hold at least one mesh (B >= 1)")
        if vertices.shape[1] < self.topology.n_vertices:
            raise AvatarqError(
                f"vertices has {vertices.shape[1]} vertices but the topology references "
                f"{self.topology.n_vertices}"
            )
        if not isinstance(M, torch.Tensor) or M.shape != (vertices.shape[0], 3, 4):
            raise AvatarqError(
                f"M must be a float tensor [B, 3, 4] with B = {vertices.shape[0]}, "
                f"got {_describe(M)}"
            )
        if not M.is_floating_point():
            raise AvatarqError(f"M must be a float tensor, got {M.dtype}")

    def _device(self, x: torch.Tensor) -> torch.device:
        if isinstance(self._raster, NvdiffrastRaster):
            return self._raster.device
        return x.device

    def _topology_tensors(
        self, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vert_ids int32 [F, 3], uv_ids int32 [F, 3], uvs float32 [Vt, 2]) on device."""
        if device not in self._tables:
            topo = self.topology
            self._tables[device] = (
                torch.from_numpy(topo.vert_ids).to(device),
                torch.from_numpy(topo.uv_ids).to(device),
                torch.from_numpy(topo.uvs).to(device),
            )
        return self._tables[device]

    def _rasterize(
        self, vertices: torch.Tensor, M: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._device(vertices)
        pos = project_to_clip(
            vertices.to(device), M.to(device), self.resolution, self.config.perspective_correct
        )
        vert_ids = self._topology_tensors(device)[0]
        return self._raster.rasterize(pos, vert_ids, self.resolution), pos


def visible_texels(
    vertices: torch.Tensor,
    M: torch.Tensor,
    topology: Topology,
    resolution: tuple[int, int] = CAPTURE_RESOLUTION,
    tex_size: int = 1024,
    backend: str = "auto",
) -> torch.Tensor:
    """POCA's visibility mask, bool [B, tex_size, tex_size]; see `Renderer.visible_texels`.

    Builds a `Renderer` per call; for many calls keep one `Renderer` and use its method.
    """
    renderer = Renderer(topology, RenderConfig(resolution=tuple(resolution), backend=backend))
    return renderer.visible_texels(vertices, M, tex_size)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__
