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

from collections.abc import Iterator

import torch

from avatarq.errors import AvatarqError

SUBPIXEL_BITS = 4
"""cudaraster's CR_SUBPIXEL_LOG2: vertex positions snap to 1/16 pixel."""

BOUNDARY_MODES = ("wrap", "clamp", "zero")
"""Texture boundary modes of nvdiffrast's ``texture()``; its default is 'wrap'."""

_SUB = 1 << SUBPIXEL_BITS
_HALF = _SUB // 2
_MAX_SNAPPED = 1 << 28  # keeps int64 edge-function products below 2^60
_ROWS_PER_CHUNK = 1 << 19  # (triangle, row) pairs set up at once
_FRAGMENTS_PER_CHUNK = 1 << 21  # covered (triangle, pixel) pairs resolved at once
_PIXELS_PER_CHUNK = 1 << 20  # pixels shaded / interpolated / textured at once
_TRI_ID_FLOAT_LIMIT = 1 << 24
_TRI_ID_FLOAT_BIAS = 0x4A800000


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


def decode_triangle_id(rast_w: torch.Tensor) -> torch.Tensor:
    """Triangle index + 1 (int64, 0 = empty) from ``rast[..., 3]`` (nvdiffrast's encoding)."""
    bits = rast_w.contiguous().view(torch.int32).to(torch.int64) - _TRI_ID_FLOAT_BIAS
    return torch.where(rast_w <= float(_TRI_ID_FLOAT_LIMIT), rast_w.to(torch.int64), bits)


def encode_triangle_id(ids: torch.Tensor) -> torch.Tensor:
    """float32 ``rast[..., 3]`` value for int64 triangle index + 1 (nvdiffrast's encoding)."""
    bits = (ids + _TRI_ID_FLOAT_BIAS).to(torch.int32).view(torch.float32)
    return torch.where(ids <= _TRI_ID_FLOAT_LIMIT, ids.to(torch.float32), bits)


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
# Rasterization of one image


def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], size):
        yield x[start : start + size]


def _floor_div(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _ceil_div(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _pixel_centres(n: int, device: torch.device) -> torch.Tensor:
    """float64 NDC coordinate of the pixel centres 0..n-1 along an axis of n pixels."""
    return (2.0 * torch.arange(n, dtype=torch.float64, device=device) + 1.0) / n - 1.0


def _frustum_culled(v: torch.Tensor) -> torch.Tensor:
    """bool [F]: all three vertices outside the same clip plane (cudaraster's cull)."""
    w = v[..., 3]
    culled = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    for axis in range(3):
        c = v[..., axis]
        culled |= (w < c).all(1) | (w < -c).all(1)
    return culled


def _rasterize_one(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    device = pos.device
    v = pos.index_select(0, tri.reshape(-1)).view(-1, 3, 4)  # [F, 3, 4] float32
    keep = torch.isfinite(v).all(dim=(1, 2)) & ~_frustum_culled(v)
    w = v[..., 3]
    front = (w > 0).all(1)

    # cudaraster snapTriangle: float32 x * (1 / w) * (size * 8), rounded half to even.
    rcp = 1.0 / w
    sx = torch.round(v[..., 0] * rcp * float(width * _HALF))
    sy = torch.round(v[..., 1] * rcp * float(height * _HALF))
    small = (sx.abs() <= _MAX_SNAPPED).all(1) & (sy.abs() <= _MAX_SNAPPED).all(1)
    exact = keep & front & small
    general = keep & ~exact

    depth = _DepthBuffer(height * width, tri.shape[0], device)
    ids = torch.nonzero(exact).squeeze(1)
    if ids.numel():
        snapped = torch.stack([sx.index_select(0, ids), sy.index_select(0, ids)], dim=-1)
        fragments = _exact_fragments(
            v.index_select(0, ids), snapped.to(torch.int64), ids, height, width
        )
        for pix, z, t in fragments:
            depth.merge(pix, z, t)
    general_ids = torch.nonzero(general).squeeze(1).tolist()
    if general_ids:
        fx = _pixel_centres(width, device)
        fy = _pixel_centres(height, device)
    for t in general_ids:
        for pix, z in _homogeneous_fragments(v[t], height, width, fx, fy):
            depth.merge(pix, z, torch.full_like(pix, t))
    return _shade(pos, tri, depth.triangle_ids(), height, width)


class _DepthBuffer:
    """Per-pixel nearest fragment, kept as one int64 key per pixel.

    The key packs an order-preserving integer image of the float64 z/w (its top
    64 - id_bits bits) above (2^id_bits - 1 - triangle index), so a single scatter-min
    keeps the nearest fragment and, among equal depths, the larger triangle index.
    With id_bits = bit length of the triangle count, depth keeps at least a 28-bit
    mantissa (for up to 2^24 triangles).
    """

    _EMPTY = torch.iinfo(torch.int64).max

    def __init__(self, n_pixels: int, n_triangles: int, device: torch.device) -> None:
        self.id_bits = max(1, int(n_triangles).bit_length())
        self.keys = torch.full((n_pixels,), self._EMPTY, dtype=torch.int64, device=device)

    def merge(self, pix: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> None:
        if pix.numel() == 0:
            return
        bits = z.contiguous().view(torch.int64)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        low = (1 << self.id_bits) - 1
        key = ((ordered >> self.id_bits) << self.id_bits) | (low - t)
        self.keys.scatter_reduce_(0, pix, key, reduce="amin")

    def triangle_ids(self) -> torch.Tensor:
        """int64 [n_pixels]: winning triangle index, -1 where empty."""
        low = (1 << self.id_bits) - 1
        ids = low - (self.keys & low)
        return torch.where(self.keys == self._EMPTY, -1, ids)


def _exact_fragments(
    v: torch.Tensor,
    snapped: torch.Tensor,
    ids: torch.Tensor,
    height: int,
    width: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Covered fragments of triangles with w > 0 everywhere, from exact integer row spans.

    Args:
        v: float32 [N, 3, 4] clip-space vertices; snapped: int64 [N, 3, 2] subpixel
            positions relative to the viewport centre; ids: int64 [N] triangle indices.

    Yields:
        (pixel index int64 [K], z/w float64 [K], triangle index int64 [K]) chunks.
    """
    device = v.device
    d1 = snapped[:, 1] - snapped[:, 0]
    d2 = snapped[:, 2] - snapped[:, 0]
    area = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    nonzero = area != 0  # degenerate after snapping: culled, as cudaraster does
    v, snapped, ids, area = v[nonzero], snapped[nonzero], ids[nonzero], area[nonzero]
    # Orient counter-clockwise (positive area) by swapping vertices 1 and 2, as cudaraster.
    swap = (area < 0).view(-1, 1, 1)
    snapped = torch.where(swap, snapped[:, [0, 2, 1]], snapped)

    # Sample (x, y) sits at subpixel (16 x + cx, 16 y + cy) relative to the centre.
    cx = _HALF - _HALF * width
    cy = _HALF - _HALF * height
    lo = snapped.min(dim=1).values
    hi = snapped.max(dim=1).values
    x0 = _ceil_div(lo[:, 0] - cx, _SUB).clamp(min=0)
    x1 = _floor_div(hi[:, 0] - cx, _SUB).clamp(max=width - 1)
    y0 = _ceil_div(lo[:, 1] - cy, _SUB).clamp(min=0)
    y1 = _floor_div(hi[:, 1] - cy, _SUB).clamp(max=height - 1)
    n_rows = torch.where(x0 <= x1, (y1 - y0 + 1).clamp(min=0), torch.zeros_like(y0))

    # Edge k runs from vertex k (origin O) to vertex k+1 (direction D). A sample S is
    # inside when E(S) = Dx (Sy - Oy) - Dy (Sx - Ox) >= thr, thr = 1 (exclusive) unless
    # the edge is a left edge or a horizontal edge at the smallest y:
    # not (Dy > 0 or (Dy == 0 and Dx <= 0)). On row Sy, with Sx = 16 px + cx, this reads
    # r >= q px with r = Dx Sy + c, q = 16 Dy, c = -Dx Oy - Dy (cx - Ox) - thr.
    origin = snapped
    direction = snapped[:, [1, 2, 0]] - snapped
    dx, dy = direction[..., 0], direction[..., 1]
    thr = ((dy > 0) | ((dy == 0) & (dx <= 0))).to(torch.int64)
    const = -dx * origin[..., 1] - dy * (cx - origin[..., 0]) - thr
    edges = [
        (dx[:, k].contiguous(), (_SUB * dy[:, k]).contiguous(), const[:, k].contiguous())
        for k in range(3)
    ]

    # z/w as an affine function of the pixel (px, py), over the snapped triangle like
    # cudaraster's depth plane: covered samples then get convex combinations of the
    # vertices' z/w, never extrapolations (which slivers would make large).
    zw = (v[..., 2].double() / v[..., 3].double()).unsqueeze(-1)
    zw = torch.where(swap, zw[:, [0, 2, 1]], zw)[..., 0]
    e1 = (snapped[:, 1] - snapped[:, 0]).double()
    e2 = (snapped[:, 2] - snapped[:, 0]).double()
    dz1, dz2 = zw[:, 1] - zw[:, 0], zw[:, 2] - zw[:, 0]
    det = area.abs().double()
    gx = (dz1 * e2[:, 1] - dz2 * e1[:, 1]) / det  # per subpixel
    gy = (e1[:, 0] * dz2 - e2[:, 0] * dz1) / det
    p0 = snapped[:, 0].double()
    zc = zw[:, 0] + gx * (cx - p0[:, 0]) + gy * (cy - p0[:, 1])
    zx, zy = _SUB * gx, _SUB * gy  # per pixel
    clip_depth = ~(v[..., 3] >= v[..., 2].abs()).all(1)
    any_clip = bool(clip_depth.any())

    row_ends = torch.cumsum(n_rows, 0)
    start = 0
    while start < ids.shape[0]:
        # Triangles [start, stop): at most _ROWS_PER_CHUNK rows, at least one triangle.
        base = int(row_ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(row_ends, base + _ROWS_PER_CHUNK, right=True))
        stop = max(stop, start + 1)
        sel = torch.arange(start, stop, device=device)
        counts = n_rows[start:stop]
        t = torch.repeat_interleave(sel, counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        row = _take(y0, t) + torch.arange(t.shape[0], device=device) - first
        span_lo, span_hi = _take(x0, t), _take(x1, t)
        ok = torch.ones_like(row, dtype=torch.bool)
        s_y = _SUB * row + cy
        for e_dx, e_q, e_c in edges:
            r = _take(e_dx, t) * s_y + _take(e_c, t)
            q = _take(e_q, t)
            # floor(r / q) bounds px from above when q > 0; ceil(r / q) from below when
            # q < 0, written as floor((r + q + 1) / q).
            bound = _floor_div(torch.where(q < 0, r + q + 1, r), torch.where(q == 0, 1, q))
            span_hi = torch.where(q > 0, torch.minimum(span_hi, bound), span_hi)
            span_lo = torch.where(q < 0, torch.maximum(span_lo, bound), span_lo)
            ok &= (q != 0) | (r >= 0)
        n_px = torch.where(ok, (span_hi - span_lo + 1).clamp(min=0), 0)
        z_row = _take(zc, t) + _take(zy, t) * row.double()
        spans = (t, row * width, span_lo, n_px, z_row, _take(zx, t))
        for pix, z, tri_local in _expand_spans(spans):
            if any_clip:
                inside = ~_take(clip_depth, tri_local) | (z.abs() <= 1.0)
                pix, z, tri_local = pix[inside], z[inside], tri_local[inside]
            yield pix, z, _take(ids, tri_local)
        start = stop


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for a 1-D x (index_select is much faster than advanced indexing on CPU)."""
    return x.index_select(0, idx)


def _expand_spans(
    spans: tuple[torch.Tensor, ...],
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fragments of row spans, in chunks of at most _FRAGMENTS_PER_CHUNK (or one span).

    Args:
        spans: per span (triangle, row * W, first pixel, pixel count, z/w at pixel x = 0
            of the row, z/w change per pixel along x), each [P].

    Yields:
        (pixel index, z/w float64, triangle) per fragment.
    """
    t, row_base, span_lo, n_px, z_row, zx = spans
    device = t.device
    px_ends = torch.cumsum(n_px, 0)
    start = 0
    while start < t.shape[0]:
        base = int(px_ends[start - 1]) if start else 0
        if base == int(px_ends[-1]):
            return
        stop = int(torch.searchsorted(px_ends, base + _FRAGMENTS_PER_CHUNK, right=True))
        stop = max(stop, start + 1)
        counts = n_px[start:stop]
        pair = torch.repeat_interleave(torch.arange(start, stop, device=device), counts)
        # Pixel k of a span: first pixel + (k - number of fragments before the span).
        offset = span_lo[start:stop] - (torch.cumsum(counts, 0) - counts)
        px = _take(offset, pair - start) + torch.arange(pair.shape[0], device=device)
        z = _take(z_row, pair) + _take(zx, pair) * px.double()
        yield _take(row_base, pair) + px, z, _take(t, pair)
        start = stop


def _homogeneous_fragments(
    v: torch.Tensor, height: int, width: int, fx: torch.Tensor, fy: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Covered pixels and z/w of one triangle by homogeneous rasterization (float64).

    Used for triangles with a vertex at w <= 0 (or off-scale coordinates): tests each
    pixel of the triangle's screen bounding box, the whole viewport when some w <= 0.
    """
    device = v.device
    p = v.to(torch.float64)  # [3, 4]
    if bool((p[:, 3] > 0).all()):
        ndc = p[:, :2] / p[:, 3:4]
        x0 = max(int(torch.floor((ndc[:, 0].min() + 1) * width / 2 - 1)), 0)
        x1 = min(int(torch.ceil((ndc[:, 0].max() + 1) * width / 2)), width - 1)
        y0 = max(int(torch.floor((ndc[:, 1].min() + 1) * height / 2 - 1)), 0)
        y1 = min(int(torch.ceil((ndc[:, 1].max() + 1) * height / 2)), height - 1)
    else:
        x0, x1, y0, y1 = 0, width - 1, 0, height - 1
    if x0 > x1 or y0 > y1:
        return
    cols = torch.arange(x0, x1 + 1, device=device)
    band = max(1, _FRAGMENTS_PER_CHUNK // cols.shape[0])
    # Edge function a_i (opposite vertex i) is affine in the sample's NDC (x, y); its
    # gradient decides ties with the same rule as the exact path.
    nxt, prv = [1, 2, 0], [2, 0, 1]
    pj, pk = p[nxt], p[prv]
    grad_x = pj[:, 1] * pk[:, 3] - pj[:, 3] * pk[:, 1]
    grad_y = pj[:, 3] * pk[:, 0] - pj[:, 0] * pk[:, 3]
    for r0 in range(y0, y1 + 1, band):
        rows = torch.arange(r0, min(r0 + band, y1 + 1), device=device)
        sx = fx[cols].repeat(rows.shape[0])
        sy = fy[rows].repeat_interleave(cols.shape[0])
        qx = p[:, 0].view(3, 1) - sx * p[:, 3].view(3, 1)  # [3, K]
        qy = p[:, 1].view(3, 1) - sy * p[:, 3].view(3, 1)
        a = qx[nxt] * qy[prv] - qy[nxt] * qx[prv]
        sign = torch.sign(a.sum(0))
        e = a * sign
        gx = grad_x.view(3, 1) * sign
        gy = grad_y.view(3, 1) * sign
        on_edge_ok = (gx > 0) | ((gx == 0) & (gy > 0))
        inside = ((e > 0) | ((e == 0) & on_edge_ok)).all(0) & (sign != 0)
        w_sum = (a * p[:, 3].view(3, 1)).sum(0)
        inside &= w_sum * sign > 0  # interpolated w > 0: in front of the camera
        zw = (a * p[:, 2].view(3, 1)).sum(0) / torch.where(w_sum == 0, 1.0, w_sum)
        inside &= zw.abs() <= 1.0
        pix = rows.repeat_interleave(cols.shape[0]) * width + cols.repeat(rows.shape[0])
        yield pix[inside], zw[inside]


def _shade(
    pos: torch.Tensor, tri: torch.Tensor, tri_ids: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """nvdiffrast's pixel shader: barycentrics and z/w at the centres of covered pixels.

    With p_i' = (x_i - fx w_i, y_i - fy w_i) for the pixel centre (fx, fy), the kernel
    forms a_0 = p_1' x p_2' (and cyclically), u = a_0 / sum(a), v = a_1 / sum(a),
    z/w = sum(z_i a_i) / sum(w_i a_i). Each a_i is affine in (fx, fy) (the fx fy terms
    cancel), so the per-triangle coefficients are formed once, in float64.
    """
    device = pos.device
    out = torch.zeros((4, height * width), dtype=torch.float32, device=device)  # planar
    covered = torch.nonzero(tri_ids >= 0).squeeze(1)
    if covered.numel() == 0:
        return out.t().reshape(height, width, 4)
    p = pos.index_select(0, tri.reshape(-1)).view(-1, 3, 4).to(torch.float64)
    x, y, z, w = p.unbind(-1)
    nxt, prv = [1, 2, 0], [2, 0, 1]
    const = x[:, nxt] * y[:, prv] - y[:, nxt] * x[:, prv]  # [F, 3]: a_i at (0, 0)
    slope_x = y[:, nxt] * w[:, prv] - w[:, nxt] * y[:, prv]
    slope_y = w[:, nxt] * x[:, prv] - x[:, nxt] * w[:, prv]
    forms = []  # (constant, d/dfx, d/dfy) of a_0, a_1, sum(a), sum(z a), sum(w a)
    for weights in (None, None, torch.ones_like(z), z, w):
        if weights is None:
            k = len(forms)
            forms.append([const[:, k], slope_x[:, k], slope_y[:, k]])
        else:
            forms.append([(c * weights).sum(1) for c in (const, slope_x, slope_y)])
    forms = [[c.contiguous() for c in f] for f in forms]
    # The pixel centre in float32 as nvdiffrast's kernel forms it: fma(2 / W, x, 1 / W - 1).
    xs = float(torch.tensor(2.0 / width, dtype=torch.float32))
    xo = float(torch.tensor(1.0 / width, dtype=torch.float32) - 1.0)
    ys = float(torch.tensor(2.0 / height, dtype=torch.float32))
    yo = float(torch.tensor(1.0 / height, dtype=torch.float32) - 1.0)
    for pix in _chunks(covered, _PIXELS_PER_CHUNK):
        t = _take(tri_ids, pix)
        fx = ((pix % width).double() * xs + xo).float().double()
        fy = (torch.div(pix, width, rounding_mode="floor").double() * ys + yo).float().double()
        a0, a1, a_sum, za, wa = (
            _take(c, t) + _take(sx, t) * fx + _take(sy, t) * fy for c, sx, sy in forms
        )
        out[0].index_copy_(0, pix, torch.nan_to_num(a0 / a_sum, nan=0.0).clamp(0, 1).float())
        out[1].index_copy_(0, pix, torch.nan_to_num(a1 / a_sum, nan=0.0).clamp(0, 1).float())
        out[2].index_copy_(0, pix, torch.nan_to_num(za / wa, nan=1.0).clamp(-1, 1).float())
        out[3].index_copy_(0, pix, encode_triangle_id(t + 1))
    return out.t().reshape(height, width, 4)


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
