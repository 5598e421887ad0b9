"""Scan conversion of one image for `avatarq.render.raster_torch` (nvdiffrast's rules).

Integer edge functions on a snapped sub-pixel grid decide coverage exactly (top-left fill
rule), a depth buffer keeps the nearest fragment, and barycentrics are computed as
nvdiffrast computes them. Work is chunked so memory stays bounded at 2048 x 1334.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from avatarq.render.raster_constants import (
    _FRAGMENTS_PER_CHUNK,
    _HALF,
    _MAX_SNAPPED,
    _PIXELS_PER_CHUNK,
    _ROWS_PER_CHUNK,
    _SUB,
    _TRI_ID_FLOAT_BIAS,
    _TRI_ID_FLOAT_LIMIT,
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
