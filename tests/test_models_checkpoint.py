"""Checkpoint loading: Multiface state_dicts with or without `module.`, config inference, errors."""

import pytest
import torch

from avatarq.errors import AvatarqError
from avatarq.models import (
    ARCHS,
    DAMConfig,
    DeepAppearanceModel,
    infer_config,
    load_checkpoint,
    save_checkpoint,
)
from avatarq.models.checkpoint import strip_prefix


def _random_model(config: DAMConfig) -> DeepAppearanceModel:
    torch.manual_seed(0)
    model = DeepAppearanceModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tex_size", [64, 128])
def test_config_is_inferred_from_tensor_shapes(arch, tex_size):
    config = DAMConfig(arch=arch, z_dim=16, tex_size=tex_size, n_vertices=40, n_cams=5)
    state = DeepAppearanceModel(config).state_dict()
    assert infer_config(state) == config


@pytest.mark.parametrize("prefix", [True, False])
def test_checkpoint_round_trips_with_and_without_module_prefix(tmp_path, prefix):
    model = _random_model(DAMConfig(arch="warp", z_dim=16, tex_size=64, n_vertices=40, n_cams=5))
    path = tmp_path / "dam.pt"
    save_checkpoint(model, path, ddp_prefix=prefix)
    keys = list(torch.load(path, weights_only=True))
    assert all(k.startswith("module.") for k in keys) == prefix
    loaded = load_checkpoint(path)
    z, view = torch.randn(2, 16), torch.randn(2, 3)
    assert torch.equal(loaded.decode(z, view)[0], model.decode(z, view)[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_checkpoint_of_every_arch_loads_by_state_dict(tmp_path, arch):
    config = DAMConfig(arch=arch, z_dim=256, tex_size=1024, n_vertices=7306, n_cams=40)
    path = tmp_path / "dam.pt"
    save_checkpoint(DeepAppearanceModel(config), path)
    assert load_checkpoint(path).config == config


def test_published_key_names_are_used():
    keys = DeepAppearanceModel(
        DAMConfig(arch="warp", z_dim=16, tex_size=64, n_vertices=4, n_cams=3)
    ).state_dict()
    for key in (
        "dec.texture_decoder.upsample.0.conv1.deconv.weight",
        "dec.texture_decoder.upsample.0.conv1.deconv.bias",
        "dec.texture_decoder.upsample.0.conv1.deconv.g",
        "dec.texture_decoder.upsample.0.conv1.bias",
        "cc.weight_anchor",
        "cc.bias_anchor",
        "warp.mlp.0.g",
        "enc.texture_encoder.downsample.0.conv1.weight",
        "enc.fc.weight",
    ):
        assert key in keys


def test_prefix_is_stripped_only_when_every_key_has_it():
    assert strip_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert strip_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = DeepAppearanceModel(
        DAMConfig(z_dim=16, tex_size=64, n_vertices=40, n_cams=5)
    ).state_dict()
    state["dec.texture_decoder.upsample.1.conv2.bias"] = torch.zeros(1, 3, 32, 32)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        AvatarqError, match=r"upsample\.1\.conv2\.bias.*\[1, 3, 32, 32\].*\[1, 3, 64, 64\]"
    ):
        load_checkpoint(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(AvatarqError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(AvatarqError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "dam.pt"
    save_checkpoint(
        DeepAppearanceModel(DAMConfig(z_dim=16, tex_size=64, n_vertices=40, n_cams=5)), path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AvatarqError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_a_state_dict_of_an_unknown_model_names_the_missing_key(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(AvatarqError, match="missing key 'dec.z_fc.weight'"):
        load_checkpoint(path)
