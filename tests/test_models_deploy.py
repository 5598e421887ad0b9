"""The deployable decoder equals the training model with weight norm folded away."""

import numpy as np
import pytest
import torch

from avatarq.models import ARCHS, DAMConfig, DeepAppearanceModel, DeployableDecoder, Normalization
from avatarq.models.layers import Conv2dWN, ConvTranspose2dWN, LinearWN


def _model(arch: str) -> DeepAppearanceModel:
    torch.manual_seed(1)
    model = DeepAppearanceModel(
        DAMConfig(arch=arch, z_dim=16, tex_size=64, n_vertices=30, n_cams=4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_decoder_matches_the_weight_normalized_model(arch):
    model = _model(arch)
    z, view = torch.randn(3, 16), torch.randn(3, 3)
    with torch.no_grad():
        ref_tex, ref_mesh = model.decode(z, view, torch.tensor([2, 2, 2]))
        tex, mesh = DeployableDecoder(model, camera=2)(z, view)
    assert torch.allclose(tex, ref_tex, atol=1e-6)
    assert torch.allclose(mesh, ref_mesh, atol=1e-6)


def test_no_weight_normalized_layer_survives_folding():
    decoder = DeployableDecoder(_model("warp"))
    assert not any(
        isinstance(m, (LinearWN, Conv2dWN, ConvTranspose2dWN)) for m in decoder.modules()
    )
    assert not any(name.endswith(".g") for name, _ in decoder.named_parameters())


def test_denormalization_is_folded_into_the_outputs():
    model = _model("base")
    rng = np.random.default_rng(0)
    norm = Normalization(
        tex_mean=rng.uniform(0, 255, (3, 64, 64)).astype(np.float32),
        tex_std=40.0,
        vert_mean=rng.normal(size=90).astype(np.float32),
        vert_std=3.0,
    )
    z, view = torch.randn(2, 16), torch.randn(2, 3)
    with torch.no_grad():
        raw_tex, raw_mesh = DeployableDecoder(model)(z, view)
        tex, mesh = DeployableDecoder(model, norm)(z, view)
    expected_tex = raw_tex * 40.0 + torch.from_numpy(norm.tex_mean)
    expected_mesh = raw_mesh * 3.0 + torch.from_numpy(norm.vert_mean).view(1, 30, 3)
    assert torch.allclose(tex, expected_tex, atol=1e-4)
    assert torch.allclose(mesh, expected_mesh, atol=1e-5)
