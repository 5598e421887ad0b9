"""The re-implemented Multiface DAM family: sizes, shapes, parameter counts."""

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
