"""The fake-quant decoder (deployed numerics in torch) and the mixed-precision plan."""

from __future__ import annotations

import pytest
import torch

from avatarq.calibration import (
    CalibrationConfig,
    CalibrationSamples,
    FakeQuantDecoder,
    calibrate,
    discover_layers,
)
from avatarq.calibration.layers import QuantizedLayer
from avatarq.calibration.precision import measured_sensitivity, omega_sensitivity, precision_plan
from avatarq.calibration.quantizers import quantize_weight, weight_scales
from avatarq.errors import AvatarqError
from avatarq.models import DeployableDecoder
from tiny_dam import tiny_calibration_decoder, tiny_calibration_samples

FAST = CalibrationConfig(iters=10, crop=8, sensitivity="none")


def tiny_decoder(seed: int = 0) -> DeployableDecoder:
    return tiny_calibration_decoder(seed)


def tiny_samples(n: int = 16) -> CalibrationSamples:
    return tiny_calibration_samples(n)


def nsr(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(((test - ref) ** 2).mean() / ref.var())


@pytest.fixture(scope="module")
def setup():
    decoder, samples = tiny_decoder(), tiny_samples()
    return decoder, samples, calibrate(decoder, samples, FAST)


def test_fake_quant_decoder_stays_close_to_fp32(setup):
    decoder, samples, artifact = setup
    with torch.no_grad():
        tex, vert = decoder(samples.z, samples.view)
        qtex, qvert = FakeQuantDecoder(decoder, artifact)(samples.z, samples.view)
    assert qtex.dtype == torch.float32 and qtex.shape == tex.shape
    assert 0 < nsr(tex, qtex) < 1e-3
    assert 0 < nsr(vert, qvert) < 1e-3


def test_int8_layers_see_inputs_and_weights_on_their_integer_grids(setup):
    decoder, samples, artifact = setup
    fq = FakeQuantDecoder(decoder, artifact)
    name = "dec.texture_decoder.upsample.0.conv2.deconv"
    layer = fq.decoder.get_submodule(name)
    assert isinstance(layer, QuantizedLayer) and layer.precision == "w8a8"
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(m.quantize_input(i[0])))
    fq(samples.z, samples.view)
    handle.remove()
    q = seen[0] / artifact[name].input_scale
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    assert q.min() >= -128.0001 and q.max() <= 127.0001
    w = layer.weight_dq / torch.from_numpy(artifact[name].weight_scale).view(1, -1, 1, 1)
    assert torch.allclose(w, torch.round(w), atol=1e-4) and w.abs().max() <= 127.0001


def test_an_all_float_plan_reproduces_the_decoder_exactly():
    decoder, samples = tiny_decoder(), tiny_samples()
    names = [info.name for info in discover_layers(decoder)]
    config = CalibrationConfig(sensitivity="none", precision={n: "fp32" for n in names})
    artifact = calibrate(decoder, samples, config)
    with torch.no_grad():
        ref = decoder(samples.z, samples.view)
        out = FakeQuantDecoder(decoder, artifact)(samples.z, samples.view)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])


def test_fp16_layers_output_float16_values():
    decoder, samples = tiny_decoder(), tiny_samples()
    config = CalibrationConfig(iters=2, sensitivity="none", precision={"dec.mesh_fc": "fp16"})
    artifact = calibrate(decoder, samples, config)
    assert artifact["dec.mesh_fc"].precision == "fp16"
    fq = FakeQuantDecoder(decoder, artifact)
    out = fq.decoder.dec.mesh_fc(torch.randn(4, 256))
    assert torch.equal(out, out.half().float())


def test_fake_quant_decoder_refuses_another_models_artifact(setup):
    _, _, artifact = setup
    with pytest.raises(AvatarqError, match="made for model"):
        FakeQuantDecoder(tiny_decoder(seed=5), artifact)


# ------------------------------------------------------------------ mixed precision
def test_omega_of_the_mesh_layer_is_twice_its_weight_only_error():
    # vertices are linear in mesh_fc's weight, so the quadratic form is exact
    decoder, samples = tiny_decoder(), tiny_samples(4)
    info = next(i for i in discover_layers(decoder) if i.name == "dec.mesh_fc")
    omega = omega_sensitivity(decoder, [info], samples.z, samples.view)["dec.mesh_fc"]
    layer = decoder.dec.mesh_fc
    scale = weight_scales(layer.weight, 0, 8)
    q = torch.from_numpy(quantize_weight(layer.weight, scale, 0, 8)).float() * scale[:, None]
    with torch.no_grad():
        _, ref = decoder(samples.z, samples.view)
        original = layer.weight.clone()
        layer.weight.copy_(q)
        _, out = decoder(samples.z, samples.view)
        layer.weight.copy_(original)
    weight_only_nsr = float(((out - ref) ** 2).mean() / ref.var(unbiased=False))
    assert omega == pytest.approx(2 * weight_only_nsr, rel=1e-3)


def test_measured_sensitivity_is_positive_for_every_layer():
    decoder, samples = tiny_decoder(), tiny_samples(4)
    layers = discover_layers(decoder)
    sens = measured_sensitivity(decoder, layers, samples.z, samples.view)
    assert list(sens) == [info.name for info in layers]
    assert all(v > 0 for v in sens.values())


def test_the_budget_keeps_the_most_sensitive_layers_in_fp16_then_overrides_apply():
    layers = discover_layers(tiny_decoder())
    names = [info.name for info in layers]
    sens = {name: float(i) for i, name in enumerate(names)}  # the last layer is most sensitive
    plan = precision_plan(layers, sens, fp16_budget=2, overrides={names[-1]: "w4a8"})
    assert plan[names[-1]] == "w4a8"
    assert [n for n, p in plan.items() if p == "fp16"] == names[-3:-1]


def test_calibrate_with_a_budget_of_one_keeps_the_most_sensitive_layer_in_fp16():
    decoder, samples = tiny_decoder(), tiny_samples(8)
    config = CalibrationConfig(iters=2, crop=8, fp16_budget=1)
    artifact = calibrate(decoder, samples, config)
    worst = max(artifact.layers, key=lambda layer: layer.sensitivity)
    assert [layer.name for layer in artifact.layers if layer.precision == "fp16"] == [worst.name]
