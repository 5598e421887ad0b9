"""Pure-torch reference rasterizer with nvdiffrast 0.3.3's output conventions.

Three functions mirror ``nvdiffrast.torch`` (CUDA rasterizer, ``RasterizeCudaContext``):
`rasterize`, `interpolate` and `texture` (filter 'linear'). They run on any device the
inputs live on (CPU included), are vectorized, and never build a tensor of size
faces x height x width: triangles are walked as exact integer row spans, in chunks.

Conventions (shared with nvdiffrast, whose sources these were checked against):

- Clip space in, pixels out. Pixel (x, y) samples NDC ((x + 0.5) / W * 2 - 1,
  (y + 0.5) / H * 2 - 1). Row 0 is NDC y = -1; nothing is flipped.
- ``rast[..., 0:2]`` are the barycentric weights (u, v) of the triangle's vertices 0 and 1
  (vertex 2 gets 1 - u - v), perspective-correct from clip-space w (screen-affine when
  w = 1), each clamped to [0, 1] as nvdiffrast does (their sum is not clamped);
  ``rast[..., 2]`` is z/w clamped to [-1, 1]; ``rast[..., 3]`` is triangle index + 1 as
  float32 (0 = no triangle; indices above 2^24 use nvdiffrast's bit encoding).
- Coverage follows cudaraster: vertex positions x/w, y/w snap to 1/16 pixel
  (round half to even, as ``cvt.rni``), triangles whose snapped area is zero are culled,
  no backface culling, and a sample exactly on an edge belongs to the triangle for which
  that edge is a left edge, or a horizontal edge at the triangle's smallest y (the
  top-left rule in memory order, row 0 on top). Two triangles sharing an edge therefore
  cover every sample on it exactly once. Coverage is evaluated with exact int64 edge
  functions.
- Depth: the nearest z/w wins; on an exact tie the triangle with the larger index wins
  (cudaraster's LEQUAL test in submission order). z/w comes from the plane through the
  snapped vertices, as cudaraster's depth plane does, evaluated in float64 and compared
  with at least a 28-bit mantissa (packed with the triangle index into one int64 key),
  not cudaraster's 32-bit fixed point, so near-ties may resolve differently.
- Clipping (nvdiffrast clips polygons to the frustum; this module decides per sample,
  which is the same set up to where clipped vertices snap):
  * triangles with every w > 0 and snapped coordinates within +-2^28 subpixels use the
    exact integer path; samples whose z/w lies outside [-1, 1] are dropped (near/far
    clipping).
  * any other triangle (some w <= 0, or enormous coordinates) goes through homogeneous
    rasterization in float64: a sample is covered when the perspective-correct
    barycentrics are all >= 0 (edge ties by the same rule), the interpolated w is > 0
    (in front of the camera) and z/w is within [-1, 1]. No triangle folds over through
    infinity. Triangles with a vertex at w <= 0 test every pixel of the viewport, so
    they are slow; avatar meshes in front of the camera have none.
  * triangles with a non-finite vertex are skipped; triangles entirely outside one
    frustum plane are culled.
- Barycentrics and z/w of a covered pixel are computed with the formula of nvdiffrast's
  pixel shader (perspective-correct edge functions at the pixel centre) in float64 and
  rounded to float32, so they agree with nvdiffrast to a few float32 ulps.
"""

from __future__ import annotations

import torch

from avatarq.errors import AvatarqError
from avatarq.render.raster_constants import (  # noqa: F401
    _PIXELS_PER_CHUNK,
    _TRI_ID_FLOAT_BIAS,
    _TRI_ID_FLOAT_LIMIT,
    BOUNDARY_MODES,
    SUBPIXEL_BITS,
)
from avatarq.render.raster_scan import (
    _chunks,
    _rasterize_one,
    _take,
    decode_triangle_id,
)

# --------------------------------------------------------------------------------------
# Public API


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """Rasterize triangles like ``nvdiffrast.torch.rasterize`` with a CUDA context.

    Args:
        pos: float32 [B, V, 4] clip-space vertex positions (x, y, z, w), any device.
        tri: integer [F, 3] vertex indices into ``pos`` (int32 as nvdiffrast wants;
            int64 is accepted).
        resolution: (H, W) output size in pixels.

    Returns:
        float32 [B, H, W, 4] on ``pos.device``: (u, v, z/w, triangle index + 1), all zero
        where no triangle covers the pixel centre. See the module docstring for the
        coverage, depth and clipping rules. nvdiffrast's second output (barycentric
        derivatives) is not produced.
    """
    _check_pos(pos)
    tri_l = _check_tri(tri, pos.shape[1], "tri")
    height, width = _check_resolution(resolution)
    out = torch.empty((pos.shape[0], height, width, 4), dtype=torch.float32, device=pos.device)
    for b in range(pos.shape[0]):
        out[b] = _rasterize_one(pos[b], tri_l, height, width)
    return out


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate vertex attributes like ``nvdiffrast.torch.interpolate`` (no derivatives).

    Args:
        attr: float32 [V, A] (shared by all images), [1, V, A] (broadcast) or [B, V, A].
        rast: float32 [B, H, W, 4] from `rasterize` (or nvdiffrast).
        tri: integer [F, 3] attribute indices per triangle; F must match the triangle
            count the rasterizer saw (the indices may differ from the position indices,
            e.g. UV indices).

    Returns:
        float32 [B, H, W, A]: u * a0 + v * a1 + (1 - u - v) * a2 of the pixel's triangle,
        zero where ``rast[..., 3] == 0``.
    """
    _check_rast(rast)
    if not isinstance(attr, torch.Tensor) or attr.ndim not in (2, 3) or attr.dtype != torch.float32:
        raise AvatarqError(
            f"attr must be a float32 tensor [V, A] or [B, V, A], got "
            f"{_describe(attr)}; convert with .float()"
        )
    batch, height, width = rast.shape[:3]
    attr3 = attr.unsqueeze(0) if attr.ndim == 2 else attr
    if attr3.shape[0] not in (1, batch):
        raise AvatarqError(
            f"attr batch size {attr3.shape[0]} does not match rast batch size {batch} "
            "(use 1 to share one attribute set)"
        )
    tri_l = _check_tri(tri, attr3.shape[1], "tri").to(rast.device)
    attr3 = attr3.to(rast.device)
    n_attr = attr3.shape[2]
    out = torch.zeros((batch, n_attr, height * width), dtype=torch.float32, device=rast.device)
    corners = [tri_l[:, k].contiguous() for k in range(3)]
    planar = None
    for b in range(batch):
        if planar is None or attr3.shape[0] > 1:
            planar = attr3[0 if attr3.shape[0] == 1 else b].t().contiguous()  # [A, V]
        r_b = rast[b].reshape(-1, 4).t()  # [4, H * W]
        ids = decode_triangle_id(r_b[3]) - 1
        pix = torch.nonzero((ids >= 0) & (ids < tri_l.shape[0])).squeeze(1)
        for chunk in _chunks(pix, _PIXELS_PER_CHUNK):
            t = _take(ids, chunk)
            a0, a1, a2 = (planar.index_select(1, _take(c, t)) for c in corners)
            b0 = r_b[0].index_select(0, chunk)
            b1 = r_b[1].index_select(0, chunk)
            b2 = 1.0 - b0 - b1
            out[b].index_copy_(1, chunk, b0 * a0 + b1 * a1 + b2 * a2)
    return out.permute(0, 2, 1).reshape(batch, height, width, n_attr).contiguous()


def texture(tex: torch.Tensor, uv: torch.Tensor, boundary_mode: str = "wrap") -> torch.Tensor:
    """Bilinear texture lookup like ``nvdiffrast.torch.texture(..., filter_mode='linear')``.

    Args:
        tex: float32 [B or 1, Ht, Wt, C]. Memory row 0 is v in [0, 1/Ht): uv (0, 0) is the
            outer corner of texel [0, 0] and texel (i, j) has its centre at
            ((j + 0.5) / Wt, (i + 0.5) / Ht) (OpenGL: v = 0 is the image bottom when row 0
            is displayed at the bottom).
        uv: float32 [B, H, W, 2] texture coordinates (u along Wt, v along Ht).
        boundary_mode: 'wrap' (nvdiffrast's default: coordinates repeat, and filtering
            across the border blends with the opposite edge), 'clamp' (clamp to edge
            texel centres) or 'zero' (texels outside the texture read as 0).

    Returns:
        float32 [B, H, W, C]. Non-finite uv give 0.
    """
    if boundary_mode not in BOUNDARY_MODES:
        raise AvatarqError(
            f"boundary_mode must be one of {', '.join(BOUNDARY_MODES)}, got {boundary_mode!r}"
        )
    if not isinstance(tex, torch.Tensor) or tex.ndim != 4 or tex.dtype != torch.float32:
        raise AvatarqError(f"tex must be a float32 tensor [B, Ht, Wt, C], got {_describe(tex)}")
    if not isinstance(uv, torch.Tensor) or uv.ndim != 4 or uv.shape[-1] != 2:
        raise AvatarqError(f"uv must be a float32 tensor [B, H, W, 2], got {_describe(uv)}")
    if uv.dtype != torch.float32:
        raise AvatarqError(f"uv must be float32, got {uv.dtype}; convert with .float()")
    batch, height, width = uv.shape[:3]
    if tex.shape[0] not in (1, batch):
        raise AvatarqError(
            f"tex batch size {tex.shape[0]} does not match uv batch size {batch} "
            "(use 1 to share one texture)"
        )
    tex = tex.to(uv.device)
    t_h, t_w, chans = tex.shape[1:]
    out = torch.empty((batch, height * width, chans), dtype=torch.float32, device=uv.device)
    planar = None
    for b in range(batch):
        if planar is None or tex.shape[0] > 1:  # channel-planar: faster gathers
            planar = tex[0 if tex.shape[0] == 1 else b].reshape(t_h * t_w, chans).t().contiguous()
        uv_b = uv[b].reshape(-1, 2)
        for s in range(0, height * width, _PIXELS_PER_CHUNK):
            e = s + _PIXELS_PER_CHUNK
            out[b, s:e] = _bilinear(planar, t_h, t_w, uv_b[s:e], boundary_mode).t()
    return out.reshape(batch, height, width, chans)


class TorchRaster:
    """The functions of this module behind the render-backend interface (any device)."""

    name = "torch"

    def rasterize(
        self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]
    ) -> torch.Tensor:
        return rasterize(pos, tri, resolution)

    def interpolate(
        self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        return interpolate(attr, rast, tri)

    def texture(
        self, tex: torch.Tensor, uv: torch.Tensor, boundary_mode: str = "wrap"
    ) -> torch.Tensor:
        return texture(tex, uv, boundary_mode)

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor
    ) -> torch.Tensor:
        raise AvatarqError(
            "antialiasing needs the nvdiffrast backend; the torch reference rasterizer has none "
            "(set antialias=False or backend='nvdiffrast')"
        )


# --------------------------------------------------------------------------------------
# Validation


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


def _check_pos(pos: torch.Tensor) -> None:
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or pos.shape[-1] != 4:
        raise AvatarqError(f"pos must be a clip-space tensor [B, V, 4], got {_describe(pos)}")
    if pos.dtype != torch.float32:
        raise AvatarqError(f"pos must be float32 (as nvdiffrast requires), got {pos.dtype}")
    if pos.shape[0] < 1 or pos.shape[1] < 1:
        raise AvatarqError(f"pos must have at least one image and vertex, got {list(pos.shape)}")


def _check_tri(tri: torch.Tensor, n_vertices: int, name: str) -> torch.Tensor:
    if not isinstance(tri, torch.Tensor) or tri.ndim != 2 or tri.shape[1] != 3:
        raise AvatarqError(f"{name} must be an integer tensor [F, 3], got {_describe(tri)}")
    if tri.dtype not in (torch.int32, torch.int64) or tri.shape[0] < 1:
        raise AvatarqError(f"{name} must be int32 [F, 3] with F >= 1, got {_describe(tri)}")
    lo, hi = int(tri.min()), int(tri.max())
    if lo < 0 or hi >= n_vertices:
        raise AvatarqError(
            f"{name} indices must lie in [0, {n_vertices}) for {n_vertices} vertices, "
            f"found [{lo}, {hi}]"
        )
    return tri.to(torch.int64)


def _check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(r) for r in resolution)
    except (TypeError, ValueError):
        raise AvatarqError(f"resolution must be (H, W), got {resolution!r}") from None
    if height < 1 or width < 1 or height > (1 << 15) or width > (1 << 15):
        raise AvatarqError(f"resolution (H, W) must lie in [1, 32768], got ({height}, {width})")
    return height, width


def _check_rast(rast: torch.Tensor) -> None:
    if not isinstance(rast, torch.Tensor) or rast.ndim != 4 or rast.shape[-1] != 4:
        raise AvatarqError(f"rast must be a tensor [B, H, W, 4], got {_describe(rast)}")
    if rast.dtype != torch.float32:
        raise AvatarqError(f"rast must be float32, got {rast.dtype}")


# --------------------------------------------------------------------------------------
# Texture


def _bilinear(
    planar: torch.Tensor, t_h: int, t_w: int, uv: torch.Tensor, boundary_mode: str
) -> torch.Tensor:
    """Bilinear lookup of [K, 2] uv in a channel-planar [C, Ht * Wt] texture -> [C, K],
    following nvdiffrast's kernel (wrap, texel-space shift, lerp order)."""
    finite = torch.isfinite(uv).all(1)
    all_finite = bool(finite.all())
    if not all_finite:
        uv = torch.where(finite[:, None], uv, torch.zeros_like(uv))
    u, v = uv[:, 0], uv[:, 1]
    if boundary_mode == "wrap":
        u = u - torch.floor(u)
        v = v - torch.floor(v)
    # u * w - 0.5 with a single rounding (the kernel's fused multiply-add).
    u = (u.double() * t_w - 0.5).float()
    v = (v.double() * t_h - 0.5).float()
    step_u = step_v = 1
    if boundary_mode == "clamp":
        u = u.clamp(0.0, t_w - 1.0)
        v = v.clamp(0.0, t_h - 1.0)
        # At a clamped edge both taps read the edge texel (zero gradient, same value).
        step_u = ((u != 0.0) & (u != t_w - 1.0)).to(torch.int64)
        step_v = ((v != 0.0) & (v != t_h - 1.0)).to(torch.int64)
    iu0 = torch.floor(u)
    iv0 = torch.floor(v)
    fu = u - iu0
    fv = v - iv0
    iu0 = iu0.to(torch.int64)
    iv0 = iv0.to(torch.int64)
    iu1 = iu0 + step_u
    iv1 = iv0 + step_v
    if boundary_mode == "wrap":
        iu0 = torch.where(iu0 < 0, iu0 + t_w, iu0)
        iv0 = torch.where(iv0 < 0, iv0 + t_h, iv0)
        iu1 = torch.where(iu1 >= t_w, iu1 - t_w, iu1)
        iv1 = torch.where(iv1 >= t_h, iv1 - t_h, iv1)

    def fetch(iu: torch.Tensor, iv: torch.Tensor) -> torch.Tensor:
        if boundary_mode == "zero":
            ok = (iu >= 0) & (iu < t_w) & (iv >= 0) & (iv < t_h) & finite
            idx = iv.clamp(0, t_h - 1) * t_w + iu.clamp(0, t_w - 1)
            return planar.index_select(1, idx) * ok.to(planar.dtype)
        return planar.index_select(1, iv * t_w + iu)

    a00, a10 = fetch(iu0, iv0), fetch(iu1, iv0)
    a01, a11 = fetch(iu0, iv1), fetch(iu1, iv1)
    top = a00 + fu * (a10 - a00)
    bottom = a01 + fu * (a11 - a01)
    out = top + fv * (bottom - top)
    if not all_finite:
        out = out * finite.to(out.dtype)
    return out
