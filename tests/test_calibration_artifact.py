"""The calibration artifact: contents, deterministic bytes, validation errors; the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatarq.calibration import (
    ARTIFACT_VERSION,
    CalibrationArtifact,
    CalibrationConfig,
    CalibrationSamples,
    calibrate,
    decoder_hash,
    parse_precision,
)
from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder

FAST = CalibrationConfig(iters=5, crop=8, sensitivity="none")


def tiny_decoder(seed: int = 0) -> DeployableDecoder:
    torch.manual_seed(seed)
    return DeployableDecoder(
        DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=16, n_vertices=10, n_cams=1))
    )


def tiny_samples(n: int = 8) -> CalibrationSamples:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, 8, generator=gen)
    view = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) + 2, dim=1)
    return CalibrationSamples.of(
        z, view, tuple(("seg", str(i), "cam") for i in range(n)), ((6, 7),)
    )


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    decoder, samples = tiny_decoder(), tiny_samples()
    artifact = calibrate(decoder, samples, FAST)
    path = artifact.save(tmp_path_factory.mktemp("calib") / "calib")
    return decoder, samples, artifact, path


def test_artifact_describes_model_samples_and_every_layer(calibrated):
    decoder, samples, artifact, path = calibrated
    doc = json.loads((path / "calib.json").read_text())
    assert doc["format"] == "avatarq-calibration" and doc["version"] == ARTIFACT_VERSION
    assert doc["model"]["hash"] == decoder_hash(decoder)
    assert doc["samples"]["hash"] == samples.hash
    assert doc["samples"]["ids"][0] == ["seg", "0", "cam"]
    assert (doc["method"], doc["tau"], doc["bits"]) == ("poca", 0.0, "w8a8")
    names = [layer["name"] for layer in doc["layers"]]
    assert names[:3] == ["dec.view_fc", "dec.z_fc", "dec.texture_fc"]
    assert names[-1] == "dec.mesh_fc"
    deconv = doc["layers"][3]
    assert deconv["weight_axis"] == 1 and deconv["rounding"] == "nearest"
    assert deconv["precision"] == "w8a8" and deconv["input_scale"] > 0
    assert (deconv["weight_bits"], deconv["act_bits"], deconv["weight_block"]) == (8, 8, 0)
    with np.load(path / "tensors.npz") as tensors:
        scale = tensors[f"{deconv['name']}/weight_scale"]
    assert scale.dtype == np.float32 and scale.shape == (deconv["weight_shape"][1],)


def test_load_round_trips_every_number(calibrated):
    decoder, _, artifact, path = calibrated
    loaded = CalibrationArtifact.load(path, decoder)
    for a, b in zip(artifact.layers, loaded.layers, strict=True):
        assert a.input_scale == b.input_scale
        assert np.array_equal(a.weight_scale, b.weight_scale)
        assert a.loss == b.loss


def test_same_inputs_write_byte_identical_artifacts(calibrated, tmp_path):
    decoder, samples, _, path = calibrated
    again = calibrate(decoder, samples, FAST).save(tmp_path / "again")
    for name in ("calib.json", "tensors.npz"):
        assert (again / name).read_bytes() == (path / name).read_bytes()


def test_adaround_stores_the_learned_integer_weights(tmp_path):
    decoder, samples = tiny_decoder(), tiny_samples()
    config = CalibrationConfig(iters=5, crop=8, sensitivity="none", adaround=True)
    path = calibrate(decoder, samples, config).save(tmp_path / "ada")
    loaded = CalibrationArtifact.load(path, decoder)
    layer = loaded["dec.z_fc"]
    assert layer.rounding == "adaround"
    assert layer.weight_int.dtype == np.int8 and layer.weight_int.shape == (256, 8)
    assert np.array_equal(layer.integer_weight(decoder.dec.z_fc.weight), layer.weight_int)


def test_a_different_model_is_refused(calibrated):
    _, _, _, path = calibrated
    with pytest.raises(AvatarqError, match="made for model"):
        CalibrationArtifact.load(path, tiny_decoder(seed=1))


def _rewrite(path, tmp_path, edit):
    doc = json.loads((path / "calib.json").read_text())
    edit(doc)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "calib.json").write_text(json.dumps(doc))
    (out / "tensors.npz").write_bytes((path / "tensors.npz").read_bytes())
    return out


def test_a_missing_layer_is_named(calibrated, tmp_path):
    decoder, _, _, path = calibrated
    edited = _rewrite(path, tmp_path, lambda d: d["layers"].pop(4))
    with pytest.raises(AvatarqError, match="missing layer 'dec.texture_decoder.upsample.0.conv2"):
        CalibrationArtifact.load(edited, decoder)


def test_an_unknown_version_is_refused(calibrated, tmp_path):
    _, _, _, path = calibrated
    edited = _rewrite(path, tmp_path, lambda d: d.update(version=99))
    with pytest.raises(AvatarqError, match="version 99"):
        CalibrationArtifact.load(edited)


def test_corrupt_json_is_one_line(calibrated, tmp_path):
    _, _, _, path = calibrated
    (tmp_path / "calib.json").write_text('{"format": "avatarq-calibration", "vers')
    (tmp_path / "tensors.npz").write_bytes((path / "tensors.npz").read_bytes())
    with pytest.raises(AvatarqError, match="not valid JSON") as info:
        CalibrationArtifact.load(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_tensors_are_reported(calibrated, tmp_path):
    _, _, _, path = calibrated
    (tmp_path / "calib.json").write_text((path / "calib.json").read_text())
    with pytest.raises(AvatarqError, match="tensors not found"):
        CalibrationArtifact.load(tmp_path)


def test_a_missing_directory_is_reported(tmp_path):
    with pytest.raises(AvatarqError, match="calibration not found"):
        CalibrationArtifact.load(tmp_path / "nope")


# ------------------------------------------------------------------ config
def test_config_round_trips_through_json():
    config = CalibrationConfig(tau=0.5, bits=6, temporal_weight=0.1, precision={"dec.z_fc": "fp16"})
    assert CalibrationConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 1.0}, "tau"),
        ({"bits": 9}, "bits"),
        ({"method": "gptq"}, "unknown calibration method"),
        ({"precision": {"dec.z_fc": "int4"}}, "precision of 'dec.z_fc'"),
        ({"version": 3}, "version 3"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        CalibrationConfig(**kwargs)


def test_precision_overrides_parse_and_name_unknown_layers():
    names = ["dec.z_fc", "dec.mesh_fc"]
    assert parse_precision("dec.mesh_fc=fp16, dec.z_fc=INT8", names) == {
        "dec.mesh_fc": "fp16",
        "dec.z_fc": "w8a8",
    }
    with pytest.raises(AvatarqError, match="unknown layer 'dec.nope'"):
        parse_precision("dec.nope=fp16", names)
    with pytest.raises(AvatarqError, match="layer=w8a8"):
        parse_precision("dec.z_fc", names)


def test_calibrate_names_an_unknown_override_layer():
    config = CalibrationConfig(iters=1, sensitivity="none", precision={"dec.nope": "fp16"})
    with pytest.raises(AvatarqError, match="unknown layer 'dec.nope'"):
        calibrate(tiny_decoder(), tiny_samples(), config)
