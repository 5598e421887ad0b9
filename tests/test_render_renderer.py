"""The render stage: Multiface's projection, textured rendering and POCA's visible texels.

Most scenes use the identity pixel camera M = [I | 0] with vertices (x, y, 1), so a vertex
lands at pixel position (x, y) and every expected value can be computed by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.render import (
    RenderConfig,
    Renderer,
    Topology,
    project_to_clip,
    visible_texels,
)
from avatarq.render.raster_nvdiffrast import nvdiffrast_available

IDENTITY_M = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]])


def quad(x0, y0, x1, y1, u0=0.0, v0=0.0, u1=1.0, v1=1.0):
    """Vertices [1, 4, 3] of a pixel-space rectangle at depth 1 and its topology, with
    texture coordinates running linearly from (u0, v0) at (x0, y0) to (u1, v1)."""
    vertices = torch.tensor([[[x0, y0, 1.0], [x1, y0, 1.0], [x1, y1, 1.0], [x0, y1, 1.0]]])
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    uvs = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float32)
    return vertices, Topology(faces, faces, uvs)


def torch_renderer(topology, height, width, **kw):
    return Renderer(topology, RenderConfig(resolution=(height, width), backend="torch", **kw))


def test_projection_on_a_known_camera():
    # K = [[100, 0, 60], [0, 100, 40], [0, 0, 1]], camera 2 units in front of the head:
    # vertex (0.2, -0.1, 0) lands at pixel (100 * 0.2 / 2 + 60, 100 * -0.1 / 2 + 40).
    K = torch.tensor([[100.0, 0, 60], [0, 100.0, 40], [0, 0, 1]])
    Rt = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.0]])
    M = (K @ Rt)[None]
    vertices = torch.tensor([[[0.2, -0.1, 0.0], [0.0, 0.0, 2.0]]])
    pos = project_to_clip(vertices, M, (80, 120))
    # u = 70, v = 35, p_z = 2 (max p_z over the mesh is 4); second vertex at the centre.
    expected = torch.tensor([[[70 / 60 - 1, 35 / 40 - 1, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    torch.testing.assert_close(pos, expected)


def test_perspective_correct_projection_uses_w_equal_to_depth():
    K = torch.tensor([[100.0, 0, 60], [0, 100.0, 40], [0, 0, 1]])
    Rt = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2.0]])
    vertices = torch.tensor([[[0.2, -0.1, 0.0], [0.0, 0.0, 2.0]]])
    affine = project_to_clip(vertices, (K @ Rt)[None], (80, 120))
    persp = project_to_clip(vertices, (K @ Rt)[None], (80, 120), perspective_correct=True)
    torch.testing.assert_close(persp[..., 3], torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(persp[..., :2] / persp[..., 3:], affine[..., :2])
    # z / w = 1 - c / p_z with c = half the nearest depth (2): 0.5 and 0.75.
    torch.testing.assert_close(persp[..., 2] / persp[..., 3], torch.tensor([[0.5, 0.75]]))


def test_constant_texture_fills_exactly_the_covered_pixels():
    vertices, topo = quad(2, 1, 6, 5)
    tex = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    out = torch_renderer(topo, 8, 10).render(vertices, tex, IDENTITY_M)
    expected_mask = torch.zeros(8, 10)
    expected_mask[1:5, 2:6] = 1.0
    assert out.image.shape == (1, 8, 10, 3) and out.mask.shape == (1, 8, 10)
    assert torch.equal(out.mask[0], expected_mask)
    expected_image = expected_mask[..., None] * torch.tensor([0.2, 0.4, 0.6])
    torch.testing.assert_close(out.image[0], expected_image)


def test_texture_is_sampled_screen_affinely_and_keeps_its_scale():
    # Texture value = 100 x column index (T = 8): sampling at u gives 100 (8 u - 0.5).
    # u runs from 0.125 at x = 0 to 0.875 at x = 16, so pixel i shows
    # 100 (0.5 + 0.375 (i + 0.5)).
    vertices, topo = quad(0, 0, 16, 4, u0=0.125, u1=0.875, v0=0.25, v1=0.75)
    tex = (100.0 * torch.arange(8.0)).view(1, 1, 1, 8).expand(1, 3, 8, 8)
    out = torch_renderer(topo, 4, 16).render(vertices, tex, IDENTITY_M)
    expected = 100 * (0.5 + 0.375 * (torch.arange(16) + 0.5))
    for channel in range(3):
        torch.testing.assert_close(
            out.image[0, :, :, channel], expected.expand(4, 16), atol=1e-3, rtol=0
        )


def test_texture_rows_follow_v_in_the_on_load_orientation():
    # Rows 0-3 of the [B, 3, T, T] tensor are red, rows 4-7 green. The left quad samples
    # v in [0.1, 0.4] (rows 0.3..2.7), the right one v in [0.6, 0.9] (rows 4.3..6.7).
    left, _ = quad(0, 0, 4, 4, v0=0.1, v1=0.4, u0=0.2, u1=0.8)
    right, _ = quad(4, 0, 8, 4, v0=0.6, v1=0.9, u0=0.2, u1=0.8)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]], dtype=np.int32)
    uvs = np.array(
        [[0.2, 0.1], [0.8, 0.1], [0.8, 0.4], [0.2, 0.4], [0.2, 0.6], [0.8, 0.6], [0.8, 0.9]]
        + [[0.2, 0.9]],
        dtype=np.float32,
    )
    topo = Topology(faces, faces, uvs)
    tex = torch.zeros(1, 3, 8, 8)
    tex[0, 0, :4] = 1.0
    tex[0, 1, 4:] = 1.0
    out = torch_renderer(topo, 4, 8).render(torch.cat([left, right], 1), tex, IDENTITY_M)
    red, green = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(out.image[0, :, :4], red.expand(4, 4, 3))
    torch.testing.assert_close(out.image[0, :, 4:], green.expand(4, 4, 3))


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_surface_hides_the_farther_one(near_first):
    # A red quad at depth 1 and a green quad at depth 2 that projects onto the same
    # pixels (its x, y doubled): the red one shows whichever comes first.
    near, _ = quad(0, 0, 4, 4)
    far = torch.cat([near[..., :2] * 2, torch.full((1, 4, 1), 2.0)], -1)
    red_uvs = np.array([[0.1, 0.3], [0.4, 0.3], [0.4, 0.4], [0.1, 0.4]], dtype=np.float32)
    green_uvs = red_uvs + np.array([0.5, 0.0], dtype=np.float32)  # right half of the texture
    vertices = torch.cat([near, far] if near_first else [far, near], 1)
    uvs = np.concatenate([red_uvs, green_uvs] if near_first else [green_uvs, red_uvs])
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]], dtype=np.int32)
    tex = torch.zeros(1, 3, 8, 8)
    tex[0, 0, :, :4] = 1.0
    tex[0, 1, :, 4:] = 1.0
    renderer = torch_renderer(Topology(faces, faces, uvs), 4, 4)
    out = renderer.render(vertices, tex, IDENTITY_M)
    torch.testing.assert_close(out.image[0], torch.tensor([1.0, 0, 0]).expand(4, 4, 3))


def test_visible_texels_of_a_mesh_covering_the_left_half_of_uv_space():
    # Full-screen quad with u in [0, 0.5], v in [0, 1], T = 8: pixel centres give
    # round(7 u) in 0..3 and round(7 v) in 0..7.
    vertices, topo = quad(0, 0, 32, 32, u0=0.0, u1=0.5, v0=0.0, v1=1.0)
    mask = torch_renderer(topo, 32, 32).visible_texels(vertices, IDENTITY_M, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, :, :4] = True
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_visible_texels_ignore_the_background():
    # The quad covers the left half of the screen and samples u, v in [0.5, 1]:
    # round(7 u) and round(7 v) in 4..7. Background pixels (interpolated uv = 0) must not
    # mark texel (0, 0).
    vertices, topo = quad(0, 0, 16, 32, u0=0.5, u1=1.0, v0=0.5, v1=1.0)
    mask = visible_texels(vertices, IDENTITY_M, topo, (32, 32), 8, backend="torch")
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 4:, 4:] = True
    assert torch.equal(mask, expected)


def test_visible_texels_per_image_camera():
    # Image 1 looks at the quad; image 2's camera shifts it off screen.
    vertices, topo = quad(0, 0, 32, 32, u0=0.0, u1=0.5, v0=0.0, v1=1.0)
    away = IDENTITY_M.clone()
    away[0, 0, 3] = 100.0
    mask = torch_renderer(topo, 32, 32).visible_texels(
        vertices.repeat(2, 1, 1), torch.cat([IDENTITY_M, away]), 8
    )
    assert int(mask[0].sum()) == 32
    assert not bool(mask[1].any())


def test_render_config_round_trips_through_json():
    config = RenderConfig(resolution=(512, 334), backend="torch", perspective_correct=True)
    assert RenderConfig.from_dict(json.loads(config.to_json())) == config
    assert RenderConfig().resolution == (2048, 1334)
    assert RenderConfig().backend == "auto" and not RenderConfig().perspective_correct


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": (0, 10)}, "resolution"),
        ({"resolution": (10,)}, "resolution"),
        ({"backend": "opengl"}, "unknown render backend"),
        ({"backend": "torch", "antialias": True}, "nvdiffrast"),
        ({"version": 99}, "version"),
    ],
)
def test_render_config_rejects_bad_values(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        RenderConfig(**kwargs)


def test_render_config_rejects_unknown_keys():
    with pytest.raises(AvatarqError, match=r"unknown render config key\(s\) \['colour'\]"):
        RenderConfig.from_dict({"colour": "red"})


@pytest.mark.skipif(nvdiffrast_available(), reason="nvdiffrast is usable here")
def test_nvdiffrast_backend_without_it_is_a_clear_error():
    _, topo = quad(0, 0, 4, 4)
    with pytest.raises(AvatarqError, match="backend='torch'"):
        Renderer(topo, RenderConfig(backend="nvdiffrast"))
    with pytest.raises(AvatarqError, match="antialias"):
        Renderer(topo, RenderConfig(backend="auto", antialias=True))


def test_renderer_rejects_mismatched_inputs():
    vertices, topo = quad(0, 0, 4, 4)
    renderer = torch_renderer(topo, 4, 4)
    tex = torch.zeros(1, 3, 4, 4)
    with pytest.raises(AvatarqError, match="vertices has 3 vertices"):
        renderer.render(vertices[:, :3], tex, IDENTITY_M)
    with pytest.raises(AvatarqError, match=r"M must be a float tensor \[B, 3, 4\]"):
        renderer.render(vertices, tex, IDENTITY_M[:, :, :3])
    with pytest.raises(AvatarqError, match="texture batch size 2"):
        renderer.render(vertices, tex.repeat(2, 1, 1, 1), IDENTITY_M)
    with pytest.raises(AvatarqError, match="tex_size"):
        renderer.visible_texels(vertices, IDENTITY_M, 0)


def test_importing_the_render_stage_does_not_import_nvdiffrast():
    code = "import sys, avatarq.render; print('nvdiffrast' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


# --------------------------------------------------------------------------------------
# Agreement with nvdiffrast (needs CUDA and the diffrp-nvdiffrast package)


@pytest.mark.gpu
@pytest.mark.skipif(not nvdiffrast_available(), reason="needs CUDA and nvdiffrast")
def test_renderers_agree_except_at_silhouette_pixels():
    from test_render_raster import sphere_scene

    height, width = 512, 334
    pos, faces = sphere_scene(height, width)
    # Back to head-local vertices under the identity pixel camera: (u, v, depth) with
    # u, v in pixels; z = depth / max(depth) is then exactly what the scene used.
    u = (pos[0, :, 0] + 1) * width / 2
    v = (pos[0, :, 1] + 1) * height / 2
    depth = pos[0, :, 2]
    vertices = torch.stack([u * depth, v * depth, depth], -1)[None]
    uvs = torch.rand(pos.shape[1], 2, generator=torch.Generator().manual_seed(5))
    topo = Topology(faces.numpy(), faces.numpy(), uvs.numpy())
    tex = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    outputs = {}
    for backend in ("torch", "nvdiffrast"):
        config = RenderConfig(resolution=(height, width), backend=backend)
        outputs[backend] = Renderer(topo, config).render(vertices, tex, IDENTITY_M)
    a, b = outputs["torch"], outputs["nvdiffrast"]
    mask_differs = a.mask.cpu() != b.mask.cpu()
    share = float(mask_differs.float().mean())
    print(f"coverage differs at {share:.4%} of pixels")
    assert share < 0.005
    both = (a.mask.cpu() > 0) & (b.mask.cpu() > 0)
    close = (a.image.cpu() - b.image.cpu()).abs().amax(-1) < 1e-3
    assert float((~close & both).float().mean()) < 0.01
