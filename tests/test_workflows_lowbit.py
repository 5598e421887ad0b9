"""The low-bit study: formats x methods x seeds on a held-out clip, summarized with spread."""

from __future__ import annotations

import math

import pytest

from avatarq.errors import AvatarqError
from avatarq.workflows.lowbit import LowbitMethod, LowbitRow, LowbitStudy, lowbit_study


@pytest.fixture(scope="module")
def study(small_avatar, tmp_path_factory):
    methods = [
        LowbitMethod("max", {"method": "max"}),
        LowbitMethod("poca+gptq", {"gptq": True, "iters": 2, "crop": 8, "sensitivity": "none"}),
    ]
    return lowbit_study(
        small_avatar.checkpoint,
        small_avatar.capture_root,
        tmp_path_factory.mktemp("lowbit"),
        bit_widths=("w4a8", "fp8"),
        methods=methods,
        seeds=(0, 1),
        n_random=8,
        max_frames=4,
        threads=1,
    )


def test_every_applicable_format_method_and_seed_is_measured(study):
    keys = [(r.bits, r.method, r.seed) for r in study.rows]
    assert sorted(keys) == sorted(
        [(b, m, s) for b in ("w4a8", "fp8") for m in ("max", "poca+gptq") for s in (0, 1)
         if not (b == "fp8" and m == "poca+gptq")]
    )  # fmt: skip
    for r in study.rows:
        assert 20 < r.psnr_seen < 200 and r.tde_seen >= 0 and r.bytes > 0


def test_calibration_and_evaluation_frames_interleave_by_default(study):
    assert study.setup["samples"]["holdout"] == "frames"
    assert study.setup["clip"]["source"].endswith("even frames")
    assert study.setup["samples"]["frames"] == 6  # the odd frames of two 6-frame segments


def test_summary_reports_mean_and_spread_over_seeds(study):
    entry = next(e for e in study.summary() if (e["bits"], e["method"]) == ("w4a8", "max"))
    values = [r.psnr_seen for r in study.rows if (r.bits, r.method) == ("w4a8", "max")]
    assert entry["n"] == 2
    assert entry["psnr_seen"]["mean"] == pytest.approx(sum(values) / 2)
    assert (entry["psnr_seen"]["min"], entry["psnr_seen"]["max"]) == (min(values), max(values))
    table = study.markdown(fp32_bytes=study.setup["fp32_bytes"])
    assert table.count("\n") == 2 + 3 - 1 and "| w4a8 | poca+gptq |" in table


def test_a_study_round_trips_through_json_and_resumes_without_remeasuring(
    study, small_avatar, tmp_path
):
    again = LowbitStudy.from_json(study.to_json())
    assert [r.psnr_seen for r in again.rows] == [r.psnr_seen for r in study.rows]
    resumed = lowbit_study(
        small_avatar.checkpoint, small_avatar.capture_root, tmp_path, ("w4a8",),
        [LowbitMethod("max", {"method": "max"})], seeds=(0,), max_frames=4, done=again,
    )  # fmt: skip
    assert len(resumed.rows) == len(study.rows)


def test_method_names_must_be_unique(small_avatar, tmp_path):
    with pytest.raises(AvatarqError, match="its own name"):
        lowbit_study(
            small_avatar.checkpoint, small_avatar.capture_root, tmp_path,
            methods=[LowbitMethod("a"), LowbitMethod("a")],
        )  # fmt: skip


def test_the_markdown_spread_shows_min_and_max():
    rows = [
        LowbitRow("w4a8", "m", s, p, 1e-4, 0.5, p, 1e-4, 100, 1.0)
        for s, p in ((0, 60.0), (1, 62.0))
    ]
    line = LowbitStudy(rows).markdown().splitlines()[-1]
    assert "61.0 [60.0..62.0]" in line and not math.isnan(rows[0].psnr_seen)


def test_a_given_clip_is_the_evaluation_and_calibration_uses_every_frame(small_avatar, tmp_path):
    from avatarq.bench.sequences import sequence_from_capture
    from avatarq.data.capture import MultifaceCapture

    capture = MultifaceCapture(small_avatar.capture_root)
    segment = list(capture.clips())[-1][0]
    clip = sequence_from_capture(capture, segment, small_avatar.checkpoint, max_frames=3)
    result = lowbit_study(
        small_avatar.checkpoint, small_avatar.capture_root, tmp_path, ("w8a8",),
        [LowbitMethod("max", {"method": "max"})], seeds=(0,), n_random=4, clip=clip,
    )  # fmt: skip
    assert result.setup["clip"] == {"source": clip.source, "frames": 3}
    assert result.setup["samples"]["frames"] == len(capture.frames)


def test_peers_are_measured_only_at_the_widths_they_have_a_form_for(small_avatar, tmp_path):
    from avatarq.workflows.lowbit_peers import PeerRecipe

    result = lowbit_study(
        small_avatar.checkpoint, small_avatar.capture_root, tmp_path, ("w8a8", "w6a6"),
        [], seeds=(0,), n_random=4, max_frames=4, peers=[PeerRecipe("ort-minmax", "ort")],
    )  # fmt: skip
    assert [(r.bits, r.method) for r in result.rows] == [("w8a8", "ort-minmax")]
    assert result.rows[0].bytes > 0 and result.rows[0].settings == {"peer": "ort"}


def test_modelopt_peers_quantize_the_decoder_with_their_recipe(small_avatar, tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    from avatarq.workflows.lowbit_peers import PeerRecipe

    peers = [PeerRecipe("modelopt-max", "modelopt"), PeerRecipe("modelopt-awq-w4a16", "modelopt")]
    result = lowbit_study(
        small_avatar.checkpoint, small_avatar.capture_root, tmp_path, ("w8a8", "w4a8"),
        [], seeds=(0,), n_random=4, max_frames=4, peers=peers,
    )  # fmt: skip
    got = {(r.bits, r.method): r for r in result.rows}
    assert sorted(got) == [
        ("w4a8", "modelopt-awq-w4a16"), ("w4a8", "modelopt-max"), ("w8a8", "modelopt-max")
    ]  # fmt: skip
    # a fake-quant model, not a graph: no size; 4-bit weights err more than 8-bit ones
    assert all(r.bytes == 0 for r in got.values())
    assert got[("w4a8", "modelopt-max")].psnr_all < got[("w8a8", "modelopt-max")].psnr_all


def test_modelopt_wxay_keeps_the_int8_recipe_with_other_bit_counts():
    pytest.importorskip("modelopt.torch.quantization")
    from avatarq.workflows.lowbit_peers import modelopt_config

    entries = modelopt_config("modelopt-max", "w6a4")["quant_cfg"]
    bits = {e["quantizer_name"]: e["cfg"]["num_bits"] for e in entries if e.get("cfg")}
    assert bits["*weight_quantizer"] == 6 and bits["*input_quantizer"] == 4


def test_a_row_without_a_size_or_a_jod_shows_a_dash():
    rows = [LowbitRow("w4a8", "peer", 0, 60.0, 1e-4, 0.5, 60.0, 1e-4, 0, 1.0)]
    line = LowbitStudy(rows).markdown(fp32_bytes=100).splitlines()[-1]
    assert line.endswith("| - | - | 1 s |")
