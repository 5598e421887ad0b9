"""Layer-wise reconstruction: crops that compute exactly, and a loss that goes down."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avatarq.calibration import CalibrationConfig, CalibrationSamples, calibrate, discover_layers
from avatarq.calibration.cache import CalibrationRun, crop2d, crop_geometry, upstream_layers
from avatarq.calibration.reconstruct import TrainableLayer, build_cache, evaluate, optimize
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder


def tiny_decoder(seed: int = 0) -> DeployableDecoder:
    """A seeded base DAM with a 32x32 texture: 4 deconvs (2 -> 32), z = 8."""
    torch.manual_seed(seed)
    model = DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=32, n_vertices=20, n_cams=1))
    with torch.no_grad():  # non-zero texel biases so that activations are not all tiny
        for name, p in model.named_parameters():
            if name.endswith("conv1.bias") or name.endswith("conv2.bias"):
                p.normal_(0, 0.3)
    return DeployableDecoder(model)


def tiny_samples(n: int = 12, clip: int = 4) -> CalibrationSamples:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, 8, generator=gen)
    view = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) + 2, dim=1)
    ids = tuple(("seg", f"{i:04d}", "cam") for i in range(n))
    return CalibrationSamples.of(z, view, ids, clips=(tuple(range(n - clip, n)),))


@pytest.mark.parametrize(
    "layer",
    [nn.ConvTranspose2d(3, 2, 4, 2, 1, bias=False), nn.Conv2d(3, 2, 3, 1, 1)],
    ids=["deconv_k4s2p1", "conv_k3s1p1"],
)
@pytest.mark.parametrize("origin", [(0, 0), (8, 4), (24, 16)], ids=["corner", "inside", "edge"])
def test_a_crop_computes_its_output_window_exactly(layer, origin):
    torch.manual_seed(0)
    size = 8
    side = 16 if isinstance(layer, nn.ConvTranspose2d) else 32  # either way a 32x32 output
    x = torch.randn(1, 3, side, side)
    full = layer(x)
    g = crop_geometry(layer, size)
    oy, ox = origin
    window = crop2d(x, g.input_start(oy), g.input_start(ox), g.in_size, g.in_size)
    out = layer(window)[..., g.out_start : g.out_start + size, g.out_start : g.out_start + size]
    assert out.shape[-2:] == (size, size)
    assert torch.allclose(out, full[..., oy : oy + size, ox : ox + size], atol=1e-6)


def test_fine_layers_are_cached_as_crops_of_the_configured_size():
    decoder = tiny_decoder()
    info = discover_layers(decoder)[-2]  # the 16 -> 32 output deconv
    assert info.out_shape[-1] == 32
    config = CalibrationConfig(crop=8, crops_per_sample=3)
    run = CalibrationRun(decoder, [info], {info.name: "w8a8"}, tiny_samples(), None, config)
    cache = build_cache(run, decoder, info, torch.Generator())
    assert cache.y.shape == (12 * 3, info.out_shape[0], 8, 8)
    assert cache.mask.shape == (12 * 3, 1, 8, 8)
    # 3 consecutive pairs in the clip of 4, each for 3 crops at shared positions
    assert cache.pairs.shape == (9, 2)


def test_reconstruction_lowers_the_masked_loss_of_a_badly_initialized_layer():
    decoder = tiny_decoder()
    info = next(i for i in discover_layers(decoder) if i.kind == "conv_transpose")
    config = CalibrationConfig(iters=60, lr=2e-2, batch=8, tau=0.5)
    gen = torch.Generator().manual_seed(0)
    run = CalibrationRun(decoder, [info], {info.name: "w8a8"}, tiny_samples(), None, config)
    cache = build_cache(run, decoder, info, gen)
    amax = float(cache.x.abs().max())
    layer = TrainableLayer(decoder.get_submodule(info.name), info, config, 4 * amax / 127, 0.0)
    before, _ = evaluate(layer, cache)
    curve = optimize(layer, cache, config, gen)
    after, _ = evaluate(layer, cache)
    assert len(curve) >= 5
    assert after < 0.5 * before


def test_poca_records_a_loss_curve_and_never_ends_above_its_start():
    decoder = tiny_decoder()
    config = CalibrationConfig(iters=20, sensitivity="none", tau=0.5, crop=8)
    artifact = calibrate(decoder, tiny_samples(), config)
    for layer in artifact.layers:
        loss = layer.loss
        assert 1 <= loss["iters"] <= 20
        assert len(loss["curve"]) == loss["iters"]
        assert loss["final"] <= loss["initial"]  # a worse end reverts to the start


def test_temporal_term_is_measured_on_the_clip_pairs():
    decoder = tiny_decoder()
    config = CalibrationConfig(iters=5, sensitivity="none", temporal_weight=1.0, crop=8)
    artifact = calibrate(decoder, tiny_samples(), config)
    spatial = [layer for layer in artifact.layers if layer.kind == "conv_transpose"]
    assert all(layer.loss["temporal_final"] >= 0 for layer in spatial)


def test_max_method_uses_the_absolute_maximum_of_each_layer_input():
    decoder = tiny_decoder()
    samples = tiny_samples()
    artifact = calibrate(decoder, samples, CalibrationConfig(method="max", sensitivity="none"))
    inputs = []
    name = "dec.texture_decoder.upsample.0.conv1.deconv"
    handle = decoder.get_submodule(name).register_forward_hook(
        lambda m, i, o: inputs.append(i[0].detach())
    )
    with torch.no_grad():
        decoder(samples.z, samples.view)
    handle.remove()
    assert artifact[name].input_scale == pytest.approx(float(inputs[0].abs().max()) / 127, rel=1e-6)
    assert artifact[name].loss == {}


def test_upstream_layers_follow_the_data_flow():
    decoder = tiny_decoder()
    up = upstream_layers(decoder, discover_layers(decoder))
    assert up["dec.view_fc"] == frozenset() and up["dec.z_fc"] == frozenset()
    assert up["dec.mesh_fc"] == {"dec.z_fc"}
    assert up["dec.texture_decoder.upsample.0.conv2.deconv"] == {
        "dec.view_fc",
        "dec.z_fc",
        "dec.texture_fc",
        "dec.texture_decoder.upsample.0.conv1.deconv",
    }


def test_capturing_later_layers_early_does_not_change_the_result(monkeypatch):
    import avatarq.calibration.reconstruct as reconstruct

    decoder, samples = tiny_decoder(), tiny_samples()
    config = CalibrationConfig(iters=3, sensitivity="none", crop=8)
    grouped = calibrate(decoder, samples, config).to_json()
    monkeypatch.setattr(reconstruct, "GROUP_SLACK", -1.0)  # every layer in its own pass
    assert calibrate(decoder, samples, config).to_json() == grouped
