"""The calibration comparison: avatarq and ONNX Runtime quantize_static on the same samples."""

from __future__ import annotations

import math

import pytest
import torch

from avatarq.calibration.config import CalibrationConfig
from avatarq.calibration.from_files import load_samples
from avatarq.calibration.masks import visibility_masks
from avatarq.calibration.pipeline import calibrate
from avatarq.data.capture import MultifaceCapture
from avatarq.data.encode import capture_normalization
from avatarq.errors import AvatarqError
from avatarq.models.checkpoint import load_checkpoint
from avatarq.models.deploy import DeployableDecoder
from avatarq.workflows.peers import (
    PeerMethod,
    compare_calibrations,
    default_methods,
    replace_marked_block,
)

ORT_MINMAX = PeerMethod("ORT MinMax", ort_method="MinMax")
AVATARQ_MAX = PeerMethod("avatarq max", CalibrationConfig(method="max"))
ORT_LAYERS = PeerMethod(
    "ORT layers", ort_method="MinMax", ort_symmetric=True, ort_layer_ops_only=True
)


@pytest.fixture(scope="module")
def study(small_avatar, tmp_path_factory):
    return compare_calibrations(
        small_avatar.checkpoint,
        small_avatar.capture_root,
        tmp_path_factory.mktemp("peers"),
        [ORT_MINMAX, ORT_LAYERS, AVATARQ_MAX],
        n_random=8,
        max_frames=6,
        threads=1,
    )


def test_one_row_per_method_in_order(study):
    assert [r.name for r in study.rows] == ["ORT MinMax", "ORT layers", "avatarq max"]
    assert [r.tool for r in study.rows] == ["onnxruntime", "onnxruntime", "avatarq"]


def test_every_int8_graph_stays_close_to_fp32_and_jitter_is_measured(study):
    for row in study.rows:
        assert 25.0 < row.psnr < 120.0, row
        assert row.psnr_min <= row.psnr
        assert row.tde > 0 and 0 < row.jitter_ratio < 2
        assert math.isfinite(row.psnr_visible) and row.tde_visible > 0
        assert 0 < row.jitter_ratio_visible < 2


def test_avatarq_quantizes_only_layer_inputs(study, small_avatar):
    decoder = DeployableDecoder(load_checkpoint(small_avatar.checkpoint))
    n_layers = sum(
        isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.Linear)
        for m in decoder.modules()
    )
    rows = {r.name: r for r in study.rows}
    assert rows["avatarq max"].quantize_nodes == n_layers
    # ORT's default op set also quantizes adds, activations and reshapes; restricted to the
    # layer ops it still quantizes their outputs too.
    assert rows["ORT MinMax"].quantize_nodes > rows["ORT layers"].quantize_nodes > n_layers


def test_setup_records_model_samples_and_clip(study):
    assert study.setup["model"]["tex_size"] == 64
    assert study.setup["samples"]["count"] >= 8
    assert study.setup["clip"]["frames"] == 6


def test_markdown_table_has_a_line_per_method(study):
    lines = study.markdown().splitlines()
    assert lines[0].startswith("| method | PSNR all (min) | PSNR seen |")
    assert len(lines) == 2 + len(study.rows)
    assert lines[2].startswith("| ORT MinMax | ")


def test_json_holds_every_row(study):
    import json

    data = json.loads(study.to_json())
    assert [r["name"] for r in data["rows"]] == [r.name for r in study.rows]
    assert data["rows"][2]["settings"]["method"] == "max"


def test_methods_need_distinct_names(small_avatar, tmp_path):
    with pytest.raises(AvatarqError, match="its own name"):
        compare_calibrations(
            small_avatar.checkpoint, small_avatar.capture_root, tmp_path, [AVATARQ_MAX, AVATARQ_MAX]
        )


def test_unknown_ort_method_is_rejected():
    with pytest.raises(AvatarqError, match="unknown ONNX Runtime calibration method"):
        PeerMethod("x", ort_method="KL")


def test_default_methods_cover_peers_sweep_and_temporal_term():
    names = [m.name for m in default_methods(taus=(0.9, 0.0), temporal_weights=(0.5,))]
    assert names == [
        "ORT quantize_static MinMax",
        "ORT quantize_static Entropy",
        "ORT quantize_static MinMax, symmetric, layer inputs only",
        "avatarq max (standard PTQ, no masks)",
        "avatarq POCA tau 0.9",
        "avatarq POCA tau 0",
        "avatarq POCA tau 0 + temporal term 0.5",
    ]


def test_marked_block_is_replaced_in_place():
    text = "intro\n<!-- calibration-peers:demo:begin -->\nold\n<!-- calibration-peers:demo:end -->\nafter\n"
    out = replace_marked_block(text, "demo", "new table")
    assert (
        out
        == "intro\n<!-- calibration-peers:demo:begin -->\nnew table\n<!-- calibration-peers:demo:end -->\nafter\n"
    )


def test_marked_block_is_appended_when_missing():
    out = replace_marked_block("intro\n", "full", "table")
    assert (
        out
        == "intro\n\n<!-- calibration-peers:full:begin -->\ntable\n<!-- calibration-peers:full:end -->\n"
    )


@pytest.fixture(scope="module")
def decoder_and_samples(small_avatar):
    model = load_checkpoint(small_avatar.checkpoint)
    capture = MultifaceCapture(small_avatar.capture_root)
    decoder = DeployableDecoder(model, capture_normalization(capture))
    samples = load_samples(model, capture.root, capture, n_random=6, seed=0)
    return decoder, samples


def test_calibrate_with_shared_visibility_masks_matches_computing_them(decoder_and_samples):
    decoder, samples = decoder_and_samples
    config = CalibrationConfig(iters=5, sensitivity="none")
    with torch.no_grad():
        masks = visibility_masks(decoder, samples)
    shared = calibrate(decoder, samples, config, visibility=masks)
    own = calibrate(decoder, samples, config)
    for a, b in zip(shared.layers, own.layers, strict=True):
        assert a.input_scale == b.input_scale


def test_calibrate_rejects_visibility_masks_of_the_wrong_shape(decoder_and_samples):
    decoder, samples = decoder_and_samples
    wrong = torch.ones(len(samples), 8, 8, dtype=torch.bool)
    with pytest.raises(AvatarqError, match="visibility masks are"):
        calibrate(
            decoder, samples, CalibrationConfig(iters=5, sensitivity="none"), visibility=wrong
        )


def test_the_benchmark_script_imports_and_lists_its_options():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "calibration_peers.py"
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--avatar {demo,full,subject}" in result.stdout
