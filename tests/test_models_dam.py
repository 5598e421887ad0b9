"""The re-implemented Multiface DAM family: sizes, shapes, parameter counts."""

import numpy as np
import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.models import ARCHS, DAMConfig, DeepAppearanceModel, count_parameters

SMALL = dict(z_dim=16, tex_size=64, n_vertices=50, n_cams=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_decodes_small_texture_and_mesh(arch):
    model = DeepAppearanceModel(DAMConfig(arch=arch, **SMALL)).eval()
    z, view = torch.randn(2, 16), torch.randn(2, 3)
    texture, mesh = model.decode(z, view, cams=torch.tensor([0, 2]))
    assert texture.shape == (2, 3, 64, 64)
    assert mesh.shape == (2, 50, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_end_to_end_through_the_encoder(arch):
    model = DeepAppearanceModel(DAMConfig(arch=arch, **SMALL))
    texture, mesh, kl = model(torch.randn(2, 3, 64, 64), torch.randn(2, 50, 3), torch.randn(2, 3))
    (texture.mean() + mesh.mean() + kl).backward()
    assert model.dec.z_fc.g.grad is not None


@pytest.mark.parametrize("tex_size", [16, 32, 64, 128, 256, 512])
def test_texture_size_follows_the_block_rule(tex_size):
    config = DAMConfig(tex_size=tex_size, z_dim=8, n_vertices=10, n_cams=2)
    model = DeepAppearanceModel(config).eval()
    texture, _ = model.decode(torch.randn(1, 8), torch.randn(1, 3))
    assert texture.shape[-1] == tex_size
    assert model.dec.texture_fc.out_features == 8 * config.base_size**2


@pytest.mark.parametrize(("arch", "expected"), [("base", 24_313_818), ("warp", 33_134_492)])
def test_full_size_parameter_counts_match_the_published_ones(arch, expected):
    model = DeepAppearanceModel(
        DAMConfig(arch=arch, z_dim=256, tex_size=1024, n_vertices=7306, n_cams=40)
    )
    assert count_parameters(model) == expected


def test_full_size_texture_decoder_has_the_published_layer_table():
    config = DAMConfig()
    assert config.tex_decoder_channels() == [256, 256, 64, 64, 32, 32, 16, 16, 3]
    model = DeepAppearanceModel(config)
    biases = [
        tuple(getattr(block, conv).bias.shape)
        for block in model.dec.texture_decoder.upsample
        for conv in ("conv1", "conv2")
    ]
    assert biases[0] == (1, 256, 8, 8)
    assert biases[-1] == (1, 3, 1024, 1024)
    texel_bias_params = sum(a * b * c * d for a, b, c, d in biases)
    assert texel_bias_params == 9_142_272


def test_colour_correction_anchors_camera_zero():
    model = DeepAppearanceModel(DAMConfig(**SMALL))
    with torch.no_grad():
        model.cc.weight.fill_(2.0)
        model.cc.bias.fill_(1.0)
    tex = torch.ones(2, 3, 4, 4)
    out = model.cc(tex, torch.tensor([0, 1]))
    assert torch.equal(out[0], tex[0])
    assert torch.equal(out[1], torch.full((3, 4, 4), 3.0))


def test_weight_norm_uses_the_whole_tensor_frobenius_norm():
    model = DeepAppearanceModel(DAMConfig(**SMALL))
    layer = model.dec.texture_decoder.upsample[0].conv1.deconv
    w = layer.weight.detach()
    expected = w * layer.g.detach().view(1, -1, 1, 1) / w.pow(2).sum().sqrt()
    assert torch.allclose(layer.effective_weight(), expected)


@pytest.mark.parametrize(
    ("field", "value"), [("arch", "transformer"), ("tex_size", 100), ("z_dim", 0)]
)
def test_invalid_config_is_a_user_error(field, value):
    with pytest.raises(AvatarqError):
        DAMConfig(**{**SMALL, field: value})


def test_full_size_warp_decoder_has_multiface_s_layer_layout():
    model = DeepAppearanceModel(DAMConfig(arch="warp"))
    shapes = {k: tuple(v.shape) for k, v in model.warp.state_dict().items()}
    assert shapes["mlp.0.weight"] == (256, 256)
    assert shapes["mlp.2.weight"] == (1024, 256)
    assert shapes["upsample.0.conv1.deconv.weight"] == (256, 128, 4, 4)
    assert shapes["upsample.3.conv2.bias"] == (1, 16, 512, 512)
    assert isinstance(model.warp.upsample[4], torch.nn.Upsample)
    assert model.warp.upsample[4].size == 1024
    assert shapes["upsample.5.weight"] == (2, 16, 3, 3)
    assert shapes["upsample.5.bias"] == (2,)
    assert shapes["normal_grid"] == (1, 2, 1024, 1024)


def test_normal_grid_is_x_then_y_each_spanning_minus_one_to_one():
    grid = DeepAppearanceModel(DAMConfig(arch="warp", **SMALL)).warp.normal_grid
    line = torch.from_numpy(np.linspace(-1.0, 1.0, 64).astype(np.float32))
    assert grid.dtype == torch.float32
    assert torch.equal(grid[0, 0], line.expand(64, 64))  # x varies along columns
    assert torch.equal(grid[0, 1], line[:, None].expand(64, 64))  # y varies along rows


def test_a_zero_warp_field_fades_the_outer_half_texel_as_multiface_does():
    model = DeepAppearanceModel(DAMConfig(arch="warp", **SMALL)).eval()
    with torch.no_grad():
        model.warp.upsample[-1].weight.zero_()
        model.warp.upsample[-1].bias.zero_()
        warped = model.warp(torch.randn(1, 16), torch.ones(1, 1, 64, 64))[0, 0]
    assert warped[0, 0] == warped[-1, -1] == 0.25
    assert torch.all(warped[0, 1:-1] == 0.5) and torch.all(warped[1:-1, -1] == 0.5)
    assert torch.allclose(warped[1:-1, 1:-1], torch.ones(62, 62), atol=1e-6)


def test_the_warp_field_is_divided_by_the_texture_size():
    model = DeepAppearanceModel(DAMConfig(arch="warp", **SMALL)).eval()
    z = torch.randn(2, 16)
    with torch.no_grad():
        raw = model.warp.upsample(model.warp.mlp(z).view(-1, 256, 2, 2))
        assert torch.equal(model.warp.field(z), raw / 64)


def test_skipping_the_same_size_resize_is_exact():
    config = DAMConfig(arch="warp", z_dim=8, tex_size=32, n_vertices=10, n_cams=2)
    assert config.warp_field_size == 32
    model = DeepAppearanceModel(config).eval()
    z = torch.randn(2, 8)
    with torch.no_grad():
        with_resize = model.warp.upsample(model.warp.mlp(z).view(-1, 256, 2, 2)) / 32
        assert torch.equal(model.warp.field(z), with_resize)


def test_the_warp_grid_stays_float32_in_a_float16_decoder():
    torch.manual_seed(0)
    model = DeepAppearanceModel(DAMConfig(arch="warp", **SMALL)).eval()
    z, view = torch.randn(2, 16), torch.randn(2, 3)
    with torch.no_grad():
        reference, _ = model.decode(z, view)
        model.half()
        assert model.warp.normal_grid.dtype == torch.float32
        assert model.warp.upsample[-1].weight.dtype == torch.float16
        texture, _ = model.decode(z.half(), view.half())
    assert texture.dtype == torch.float16
    assert torch.allclose(texture.float(), reference, atol=2e-2)
