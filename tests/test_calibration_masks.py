"""POCA masks: the shape-wise std mask, pooling, and camera visibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarq.calibration.masks import (
    input_mask,
    layer_mask,
    pool_mask,
    std_mask,
    visibility_masks,
)
from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.topology import Topology
from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder, Normalization


def test_tau_09_keeps_10_percent_of_positions():
    y = torch.randn(3, 8, 20, 20, generator=torch.Generator().manual_seed(0))
    mask = std_mask(y, 0.9)
    assert mask.shape == (3, 1, 20, 20)
    # 400 positions, floor(0.9 * 400) = 360 dropped, 40 kept, in every sample
    assert mask.sum(dim=(1, 2, 3)).tolist() == [40.0, 40.0, 40.0]


def test_tau_0_keeps_every_position():
    y = torch.randn(2, 4, 8, 8)
    assert bool((std_mask(y, 0.0) == 1).all())


def test_std_mask_drops_the_positions_with_the_largest_channel_std():
    # position k (row-major) has channels (0, k): its std grows with k
    k = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    y = torch.cat([torch.zeros_like(k), k], dim=1)
    mask = std_mask(y, 0.75)  # drop 12, keep the 4 smallest
    assert mask.view(-1).tolist() == [1.0] * 4 + [0.0] * 12


def test_std_mask_breaks_ties_by_position():
    y = torch.ones(1, 3, 2, 2)  # every std is 0: drop the lowest indices first
    assert std_mask(y, 0.5).view(-1).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_tau_must_lie_in_0_1():
    with pytest.raises(AvatarqError, match="tau"):
        std_mask(torch.zeros(1, 2, 2, 2), 1.0)


def test_visibility_pools_with_kernel_and_stride_t_over_h():
    vis = torch.zeros(1, 8, 8, dtype=torch.bool)
    vis[0, 5, 2] = True
    pooled = pool_mask(vis, 2)
    assert pooled.shape == (1, 1, 2, 2)
    assert pooled.view(-1).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_layer_mask_is_the_product_of_visibility_and_std_masks():
    y = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    vis = torch.zeros(1, 8, 8, dtype=torch.bool)
    vis[0, :4, :] = True  # the bottom half of the texture (rows 0..3)
    mask = layer_mask(y, vis, 0.5)
    assert torch.equal(mask, std_mask(y, 0.5) * pool_mask(vis, 4))
    assert mask[0, 0, 2:].sum() == 0


def test_linear_outputs_have_no_mask():
    assert layer_mask(torch.randn(4, 10), None, 0.9) is None
    assert input_mask(None, 4) is None


def test_input_mask_marks_inputs_feeding_a_kept_output():
    out = torch.zeros(1, 1, 4, 4)
    out[0, 0, 3, 0] = 1
    assert input_mask(out, 2).view(-1).tolist() == [0.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------ visibility by construction
T = 16


def _quad_decoder() -> tuple[DeployableDecoder, Topology]:
    """A decoder whose mesh is always the square [-1, 1]^2 at z = 0 (4 vertices)."""
    torch.manual_seed(0)
    model = DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=T, n_vertices=4, n_cams=1))
    with torch.no_grad():
        model.dec.mesh_fc.g.zero_()
        model.dec.mesh_fc.bias.zero_()
    quad = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32)
    norm = Normalization(np.zeros((3, T, T), np.float32), 1.0, quad.reshape(-1), 1.0)
    # the quad's texture occupies u in [0, 0.5] (columns 0..7 of 16), v in [0, 1]
    uvs = np.array([[0, 0], [0.5, 0], [0.5, 1], [0, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    return DeployableDecoder(model, norm), Topology(faces, faces, uvs)


def _camera(shift: float) -> torch.Tensor:
    """128x128 pixels, focal 200 px, quad 5 units in front, shifted sideways by ``shift``."""
    K = torch.tensor([[200.0, 0, 64], [0, 200.0, 64], [0, 0, 1]])
    Rt = torch.tensor([[1.0, 0, 0, shift], [0, 1, 0, 0], [0, 0, 1, 5.0]])
    return K @ Rt


def test_visibility_marks_exactly_the_texels_the_camera_sees():
    decoder, topology = _quad_decoder()
    M = torch.stack([_camera(0.0), _camera(10.0)])  # facing the quad; quad out of the image
    samples = CalibrationSamples.of(
        torch.zeros(2, 8),
        torch.tensor([[0.0, 0, 1]] * 2),
        (("s", "0", "front"), ("s", "0", "aside")),
        M=M,
        topology=topology,
        resolution=(128, 128),
    )
    vis = visibility_masks(decoder, samples)
    assert vis.shape == (2, T, T) and vis.dtype == torch.bool
    front = vis[0]
    assert bool(front[:, :7].all())  # u < 0.45: densely sampled by 80x80 pixels
    assert not bool(front[:, 9:].any())  # u > 0.5: not part of the quad
    assert not bool(vis[1].any())  # the quad projects outside the image


def test_visibility_needs_a_denormalizing_decoder():
    decoder, topology = _quad_decoder()
    plain = DeployableDecoder(DeepAppearanceModel(decoder.config))
    samples = CalibrationSamples.of(
        torch.zeros(1, 8),
        torch.tensor([[0.0, 0, 1]]),
        (("s", "0", "c"),),
        M=_camera(0.0)[None],
        topology=topology,
        resolution=(128, 128),
    )
    with pytest.raises(AvatarqError, match="de-normalized"):
        visibility_masks(plain, samples)
