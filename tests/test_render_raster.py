"""The pure-torch rasterizer against cases whose answers are known by construction.

Positions are written in pixel units (x right, y down the rows, pixel (i, j) has its centre
at (i + 0.5, j + 0.5)) and converted to clip space with x_ndc = x / (W / 2) - 1; every
coordinate used is a multiple of 1/16 pixel, so snapping changes nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.render.raster_torch import interpolate, rasterize, texture


def clip(points, height, width, z=0.5, w=1.0):
    """[1, N, 4] clip-space positions for pixel-unit (x, y) points (scaled by w)."""
    zs = z if isinstance(z, (list, tuple)) else [z] * len(points)
    ws = w if isinstance(w, (list, tuple)) else [w] * len(points)
    rows = [
        [(x / (width / 2) - 1) * wi, (y / (height / 2) - 1) * wi, zi * wi, wi]
        for (x, y), zi, wi in zip(points, zs, ws, strict=True)
    ]
    return torch.tensor([rows], dtype=torch.float32)


def tris(*faces):
    return torch.tensor(faces, dtype=torch.int32)


def ids(rast):
    """Triangle index + 1 per pixel of image 0, as int."""
    return rast[0, ..., 3].to(torch.int64)


def test_single_triangle_covers_exactly_the_pixels_whose_centres_are_inside():
    # 6 rows x 5 columns; inside means x / 5 + y / 3.5 < 1 at the pixel centre.
    rast = rasterize(clip([(0, 0), (5, 0), (0, 3.5)], 6, 5), tris([0, 1, 2]), (6, 5))
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    assert rast.shape == (1, 6, 5, 4) and rast.dtype == torch.float32
    assert torch.equal(ids(rast), expected)
    assert torch.equal(rast[0][expected == 0], torch.zeros(int((expected == 0).sum()), 4))


@pytest.mark.parametrize(
    "faces",
    [
        ([0, 1, 2], [0, 2, 3]),  # both counter-clockwise on screen
        ([0, 2, 1], [3, 2, 0]),  # both clockwise
        ([2, 0, 1], [0, 3, 2]),  # rotated / mixed winding
    ],
)
def test_shared_edge_through_pixel_centres_is_covered_once(faces):
    # Square (0,0)-(4,4) split along the diagonal x = y, which passes through 4 centres.
    # Triangle 1 lies at x >= y; for it the diagonal is a left edge, so it owns those
    # centres (top-left rule); triangle 2 (x < y) does not.
    pos = clip([(0, 0), (4, 0), (4, 4), (0, 4)], 4, 4)
    rast = rasterize(pos, tris(*faces), (4, 4))
    i = torch.arange(4).view(1, 4)  # column
    j = torch.arange(4).view(4, 1)  # row
    assert torch.equal(ids(rast), torch.where(i >= j, 1, 2))


@pytest.mark.parametrize("faces", [([0, 1, 2], [0, 3, 1]), ([2, 1, 0], [1, 3, 0])])
def test_off_scale_triangles_keep_the_fill_rule(faces):
    # Far vertices (1e8 pixels away) exceed the exact integer path's range, so these
    # triangles go through homogeneous rasterization; the diagonal x = y is still owned
    # by the triangle at x >= y only.
    pos = clip([(0, 0), (4, 4), (1e8, 0), (0, 1e8)], 4, 4)
    rast = rasterize(pos, tris(*faces), (4, 4))
    i = torch.arange(4).view(1, 4)
    j = torch.arange(4).view(4, 1)
    assert torch.equal(ids(rast), torch.where(i >= j, 1, 2))


def test_horizontal_shared_edge_goes_to_the_triangle_below_it_in_memory():
    # Edge y = 2 passes through no centre at half-pixel rows, so put it at y = 2.5 (the
    # centres of row 2): the lower triangle in memory order (larger y) owns it, because
    # for it the edge is horizontal at its smallest y.
    pos = clip([(0, 0), (4, 0), (4, 2.5), (0, 2.5), (0, 5), (4, 5)], 5, 4)
    rast = rasterize(pos, tris([0, 1, 2], [0, 2, 3], [3, 2, 5], [3, 5, 4]), (5, 4))
    upper = ids(rast)[:2]
    lower = ids(rast)[2:]
    assert bool(((upper == 1) | (upper == 2)).all())
    assert bool(((lower == 3) | (lower == 4)).all())


def test_a_triangulated_grid_covers_every_pixel_exactly_once():
    # 5 x 5 grid of vertices on a 16 x 16 image; inner vertices sit exactly on pixel
    # centres, so many edges and vertices pass through sample points.
    coords = [0.0, 4.5, 8.5, 11.5, 16.0]
    points = [(x, y) for y in coords for x in coords]
    faces = []
    for r in range(4):
        for c in range(4):
            a, b, d, e = r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c, (r + 1) * 5 + c + 1
            faces += [[a, b, e], [a, e, d]] if (r + c) % 2 else [[a, b, d], [b, e, d]]
    pos = clip(points, 16, 16)
    count = torch.zeros(16, 16, dtype=torch.int64)
    for face in faces:
        count += (ids(rasterize(pos, tris(face), (16, 16))) > 0).to(torch.int64)
    assert torch.equal(count, torch.ones(16, 16, dtype=torch.int64))
    together = ids(rasterize(pos, torch.tensor(faces, dtype=torch.int32), (16, 16)))
    assert bool((together > 0).all())


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins_regardless_of_submission_order(near_first):
    near = [(0, 0), (8, 0), (0, 8)]
    far = [(0, 0), (8, 0), (8, 8)]
    zs = [0.2] * 3 + [0.6] * 3 if near_first else [0.6] * 3 + [0.2] * 3
    points = near + far if near_first else far + near
    rast = rasterize(clip(points, 8, 8, z=zs), tris([0, 1, 2], [3, 4, 5]), (8, 8))
    near_id = 1 if near_first else 2
    # Pixel (5, 1) is inside both triangles (x + y < 8 and x > y).
    assert ids(rast)[1, 5] == near_id
    assert rast[0, 1, 5, 2] == pytest.approx(0.2)
    # Pixel (6, 6) is inside the far triangle only.
    assert ids(rast)[6, 6] == 3 - near_id
    assert rast[0, 6, 6, 2] == pytest.approx(0.6)


def test_exact_depth_tie_goes_to_the_later_triangle():
    points = [(0, 0), (4, 0), (0, 4)]
    rast = rasterize(clip(points * 2, 4, 4), tris([0, 1, 2], [3, 4, 5]), (4, 4))
    assert ids(rast)[0, 0] == 2


def test_barycentrics_and_depth_at_pixel_centres():
    # Vertices (0,0), (8,0), (0,8): at centre (x, y), u = 1 - (x + y) / 8, v = x / 8.
    zs = [0.1, 0.5, 0.9]
    rast = rasterize(clip([(0, 0), (8, 0), (0, 8)], 8, 8, z=zs), tris([0, 1, 2]), (8, 8))
    x = torch.arange(8).view(1, 8) + 0.5
    y = torch.arange(8).view(8, 1) + 0.5
    # Centres with x + y = 8 lie on the edge from vertex 1 to vertex 2, a right edge
    # (exclusive), so coverage is x + y < 8.
    inside = x + y < 8
    assert torch.equal(ids(rast) > 0, inside)
    u = (1 - (x + y) / 8).expand(8, 8)
    v = (x / 8).expand(8, 8)
    z = u * zs[0] + v * zs[1] + (1 - u - v) * zs[2]
    torch.testing.assert_close(rast[0, ..., 0][inside], u[inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(rast[0, ..., 1][inside], v[inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(rast[0, ..., 2][inside], z[inside], atol=1e-6, rtol=0)


def test_barycentrics_are_perspective_correct_in_clip_space_w():
    # Scaling a vertex's clip coordinates by w keeps its screen position but weights it
    # by 1 / w: b_i = (l_i / w_i) / sum_j (l_j / w_j), l = screen-space barycentrics.
    w = [1.0, 2.0, 4.0]
    rast = rasterize(clip([(0, 0), (8, 0), (0, 8)], 8, 8, w=w), tris([0, 1, 2]), (8, 8))
    x = torch.arange(8).view(1, 8) + 0.5
    y = torch.arange(8).view(8, 1) + 0.5
    inside = x + y < 8
    assert torch.equal(ids(rast) > 0, inside)
    lam = [1 - (x + y) / 8, x / 8, y / 8]
    den = sum(li / wi for li, wi in zip(lam, w, strict=True))
    for channel in (0, 1):
        expected = (lam[channel] / w[channel] / den).expand(8, 8)
        got = rast[0, ..., channel]
        torch.testing.assert_close(got[inside], expected[inside], atol=1e-6, rtol=0)


def test_row_zero_is_ndc_y_minus_one():
    # A triangle in the NDC half y < 0 lands in the first rows of memory.
    rast = rasterize(clip([(0, 0), (8, 0), (4, 3)], 8, 8), tris([0, 1, 2]), (8, 8))
    rows = (ids(rast) > 0).any(dim=1)
    assert rows.tolist() == [True, True, True] + [False] * 5


def test_samples_beyond_the_far_plane_are_clipped():
    # Full-screen quad whose z/w runs from 0 at the left border to 2 at the right one:
    # only centres with z/w <= 1 (the left half) survive.
    pos = clip([(0, 0), (8, 0), (8, 4), (0, 4)], 4, 8, z=[0.0, 2.0, 2.0, 0.0])
    rast = rasterize(pos, tris([0, 1, 2], [0, 2, 3]), (4, 8))
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]]).expand(4, 8).bool()
    assert torch.equal(ids(rast) > 0, expected)
    assert float(rast[0, ..., 2].max()) <= 1.0


def test_triangle_behind_the_camera_is_not_drawn():
    # All w < 0: x / w would land on screen, but the triangle is behind the eye.
    pos = torch.tensor([[[0.5, 0.5, 0.0, -1.0], [-0.5, 0.5, 0.0, -1.0], [0.0, -0.5, 0.0, -1.0]]])
    rast = rasterize(pos, tris([0, 1, 2]), (8, 8))
    assert not bool(rast.any())


def test_triangle_crossing_the_eye_plane_shows_only_its_visible_part():
    # A = (-1, 0), B = (1, 0) in front (w = 1); C behind (w = -1), projecting to (0, -0.5).
    # The visible part (w > 0) covers every centre with y_ndc > 0 (|x| <= 1 + 2 y there);
    # dividing by w naively would instead fill the triangle below y = 0.
    pos = torch.tensor([[[-1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.0, -1.0]]])
    rast = rasterize(pos, tris([0, 1, 2]), (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:] = True
    assert torch.equal(ids(rast) > 0, expected)


def test_interpolate_reproduces_a_linear_attribute():
    points = [(0.5, 1.0), (9.0, 0.25), (7.5, 7.75), (1.0, 6.0)]
    faces = tris([0, 1, 2], [0, 2, 3])
    rast = rasterize(clip(points, 8, 10), faces, (8, 10))
    attr = torch.tensor(points, dtype=torch.float32)  # the vertices' own pixel positions
    out = interpolate(attr, rast, faces)
    covered = ids(rast) > 0
    x = (torch.arange(10).view(1, 10) + 0.5).expand(8, 10)
    y = (torch.arange(8).view(8, 1) + 0.5).expand(8, 10)
    assert int(covered.sum()) > 30
    torch.testing.assert_close(out[0, ..., 0][covered], x[covered], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, ..., 1][covered], y[covered], atol=1e-4, rtol=0)
    assert not bool(out[0][~covered].any())


def test_interpolate_broadcasts_shared_attributes():
    pos = clip([(0, 0), (6, 0), (0, 6)], 6, 6).repeat(2, 1, 1)
    faces = tris([0, 1, 2])
    rast = rasterize(pos, faces, (6, 6))
    attr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    shared = interpolate(attr, rast, faces)
    assert torch.equal(shared, interpolate(attr[None], rast, faces))
    assert torch.equal(shared, interpolate(attr[None].repeat(2, 1, 1), rast, faces))
    torch.testing.assert_close(shared[..., 0], rast[..., 0])  # attribute = vertex 0 weight


def test_texture_at_texel_centres_returns_the_texels():
    tex = torch.rand(1, 4, 6, 3, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    uv = torch.stack([(cols + 0.5) / 6, (rows + 0.5) / 4], dim=-1)[None].float()
    torch.testing.assert_close(texture(tex, uv), tex, atol=1e-6, rtol=0)


def test_texture_halfway_between_texels_is_their_mean():
    tex = torch.rand(1, 4, 6, 2, generator=torch.Generator().manual_seed(1))
    uv = torch.tensor([[[[3 / 6, 1.5 / 4]]]])  # border between columns 2 and 3 of row 1
    torch.testing.assert_close(texture(tex, uv)[0, 0, 0], (tex[0, 1, 2] + tex[0, 1, 3]) / 2)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("wrap", lambda t: (t[0, 2, 0] + t[0, 2, -1]) / 2),  # nvdiffrast's default
        ("clamp", lambda t: t[0, 2, 0]),
        ("zero", lambda t: t[0, 2, 0] / 2),
    ],
)
def test_texture_boundary_modes_at_the_left_border(mode, expected):
    tex = torch.rand(1, 4, 6, 3, generator=torch.Generator().manual_seed(2))
    uv = torch.tensor([[[[0.0, 2.5 / 4]]]])  # left border, centre of row 2
    args = () if mode == "wrap" else (mode,)
    torch.testing.assert_close(texture(tex, uv, *args)[0, 0, 0], expected(tex))


def test_bad_inputs_are_user_errors():
    pos = clip([(0, 0), (4, 0), (0, 4)], 4, 4)
    with pytest.raises(AvatarqError, match="float32"):
        rasterize(pos.double(), tris([0, 1, 2]), (4, 4))
    with pytest.raises(AvatarqError, match=r"\[0, 3\)"):
        rasterize(pos, tris([0, 1, 3]), (4, 4))
    with pytest.raises(AvatarqError, match="resolution"):
        rasterize(pos, tris([0, 1, 2]), (0, 4))
    with pytest.raises(AvatarqError, match="boundary_mode"):
        texture(torch.zeros(1, 2, 2, 3), torch.zeros(1, 1, 1, 2), "mirror")


# --------------------------------------------------------------------------------------
# Agreement with nvdiffrast (needs CUDA and the diffrp-nvdiffrast package)


def _nvdiffrast_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("nvdiffrast.torch")
    from avatarq.render.raster_nvdiffrast import NvdiffrastRaster

    return NvdiffrastRaster()


def sphere_scene(height, width, n_lat=40, n_lon=80, w=1.0):
    """A UV sphere in front of a pinhole camera, as clip-space positions and triangles."""
    theta = torch.linspace(0.05, math.pi - 0.05, n_lat)
    phi = torch.linspace(0, 2 * math.pi, n_lon + 1)[:-1]
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    xyz = torch.stack([t.sin() * p.cos() * 0.8, t.cos(), t.sin() * p.sin() * 0.9], -1)
    xyz = xyz.reshape(-1, 3)
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            faces += [[a, b, c], [b, d, c]]
    depth = xyz[:, 2] + 3.0
    u = 1.1 * height * xyz[:, 0] / depth + width / 2
    v = 1.1 * height * xyz[:, 1] / depth + height / 2
    pos = torch.stack([u / (width / 2) - 1, v / (height / 2) - 1, depth / depth.max()], -1)
    pos = torch.cat([pos, torch.ones_like(depth)[:, None]], -1) * w
    return pos[None].float().contiguous(), torch.tensor(faces, dtype=torch.int32)


def _edge_pixels(tri_ids):
    """bool [B, H, W]: pixels with a 4-neighbour of another triangle (or background)."""
    edge = torch.zeros_like(tri_ids, dtype=torch.bool)
    edge[:, 1:] |= tri_ids[:, 1:] != tri_ids[:, :-1]
    edge[:, :-1] |= tri_ids[:, 1:] != tri_ids[:, :-1]
    edge[:, :, 1:] |= tri_ids[:, :, 1:] != tri_ids[:, :, :-1]
    edge[:, :, :-1] |= tri_ids[:, :, 1:] != tri_ids[:, :, :-1]
    return edge


@pytest.mark.gpu
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_torch_rasterizer_agrees_with_nvdiffrast_except_at_edges(w):
    nv = _nvdiffrast_or_skip()
    height, width = 512, 334
    pos, faces = sphere_scene(height, width, w=w)
    ref = nv.rasterize(pos.cuda(), faces.cuda(), (height, width)).cpu()
    got = rasterize(pos, faces, (height, width))
    ref_ids, got_ids = ref[..., 3].long(), got[..., 3].long()
    differ = ref_ids != got_ids
    edge = _edge_pixels(ref_ids) | _edge_pixels(got_ids)
    share = float(differ.float().mean())
    print(
        f"w={w}: triangle ids differ at {share:.4%} of pixels, all on edges: "
        f"{not bool((differ & ~edge).any())}"
    )
    assert not bool((differ & ~edge).any())
    assert share < 0.01
    same = ~differ & (ref_ids > 0)
    torch.testing.assert_close(got[same][:, :3], ref[same][:, :3], atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_interpolate_and_texture_agree_with_nvdiffrast():
    nv = _nvdiffrast_or_skip()
    pos, faces = sphere_scene(256, 167)
    rast = nv.rasterize(pos.cuda(), faces.cuda(), (256, 167))
    attr = torch.rand(1, pos.shape[1], 2, generator=torch.Generator().manual_seed(3))
    ref_uv = nv.interpolate(attr.cuda(), rast, faces.cuda()).cpu()
    got_uv = interpolate(attr, rast.cpu(), faces)
    torch.testing.assert_close(got_uv, ref_uv, atol=1e-5, rtol=0)
    tex = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    uv = ref_uv * 3 - 1  # exercise wrapping
    for mode in ("wrap", "clamp", "zero"):
        ref = nv.texture(tex.cuda(), uv.cuda(), mode).cpu()
        torch.testing.assert_close(texture(tex, uv, mode), ref, atol=1e-4, rtol=0)


def test_exact_and_homogeneous_paths_cover_the_same_samples():
    # The integer row-span path and the float64 homogeneous path implement the same
    # coverage rule. With vertices on the half-pixel grid of a 16 x 16 image every
    # coordinate is exact in float32 and float64, so they must agree exactly, ties
    # included (vertices on pixel centres and edges through them are frequent here).
    from avatarq.render.raster_scan import _exact_fragments, _homogeneous_fragments

    gen = torch.Generator().manual_seed(7)
    height = width = 16
    points = torch.randint(0, 2 * width + 1, (60, 3, 2), generator=gen) / 2.0
    pos = clip([tuple(p) for p in points.reshape(-1, 2).tolist()], height, width)[0]
    fx = (2 * torch.arange(width, dtype=torch.float64) + 1) / width - 1
    fy = (2 * torch.arange(height, dtype=torch.float64) + 1) / height - 1
    for t in range(60):
        v = pos[3 * t : 3 * t + 3].unsqueeze(0)
        snapped = torch.stack([v[..., 0] * width * 8, v[..., 1] * height * 8], -1).round().long()
        exact = [p for p, _, _ in _exact_fragments(v, snapped, torch.tensor([t]), height, width)]
        homog = [p for p, _ in _homogeneous_fragments(v[0], height, width, fx, fy)]
        exact_set = set(torch.cat(exact).tolist()) if exact else set()
        homog_set = set(torch.cat(homog).tolist()) if homog else set()
        assert exact_set == homog_set, f"triangle {t}: {points[t].tolist()}"
