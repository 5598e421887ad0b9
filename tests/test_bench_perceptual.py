"""`avatarq bench --perceptual`: the JOD of each runner's clip, in the report and in gates.

The FP32 bundle of the small synthetic avatar plays its first segment against itself, or
through a wrapper that adds a per-frame texture offset (a deployed model with a known
error); FovVideoVDP scores the rendered clip on the CPU.
"""

from __future__ import annotations

import json

import pytest

from avatarq.bench import BenchConfig, load_sequence, run_bench
from avatarq.bench.report import load_report, render_html, write_report
from avatarq.bench.sequences import with_image_size
from avatarq.engines import open_runner
from avatarq.errors import AvatarqError
from avatarq.export import open_bundle
from avatarq.measure.perceptual import MAX_JOD, available
from conftest import SMALL_CAPTURE
from test_bench_harness import OffsetRunner

pytestmark = pytest.mark.skipif(
    not available("fvvdp"), reason="pyfvvdp is not installed (pip install 'avatarq[perceptual]')"
)
SEGMENT = "E001_Jaw_Open_Brow_Raise"
CAMERA_IMAGE = (SMALL_CAPTURE.image_height, SMALL_CAPTURE.image_width)
FAST = dict(resolution=(64, 42), warmup=1, iters=2, compute_ssim=False, perceptual="fvvdp")


@pytest.fixture(scope="module")
def bundle(small_bundle):
    return open_bundle(small_bundle)


@pytest.fixture(scope="module")
def clip(small_avatar, bundle):
    spec = f"{small_avatar.capture_root}:{SEGMENT}"
    seq = load_sequence(spec, bundle.manifest.z_dim, small_avatar.checkpoint)
    return with_image_size(seq, CAMERA_IMAGE)


@pytest.fixture(scope="module")
def self_result(bundle, clip):
    config = BenchConfig(runners=("onnx",), render="torch", gates=("jod>=9.99",), **FAST)
    return run_bench(bundle, clip, config)


@pytest.fixture(scope="module")
def jitter_result(bundle, clip):
    """A texture offset of +-6/255 alternating every frame, gated at jod>=9.99."""
    runner = OffsetRunner(open_runner(bundle, "onnx"), lambda t: 6.0 * (-1) ** t)
    config = BenchConfig(render="torch", gates=("jod>=9.99",), **FAST)
    return run_bench(bundle, clip, config, runners=[runner])


@pytest.mark.slow
def test_a_bundle_against_itself_scores_the_maximum_jod_on_its_rendered_clip(self_result):
    (r,) = self_result.runners
    assert r.perceptual.jod == MAX_JOD
    assert r.perceptual_space == "screen"
    assert (r.perceptual.metric, r.perceptual.display, r.perceptual.fps) == (
        "fvvdp",
        "standard_fhd",
        30.0,
    )
    assert r.perceptual.frames == 6
    assert self_result.passed


@pytest.mark.slow
def test_a_flickering_error_lowers_the_jod_and_fails_its_gate(jitter_result):
    (r,) = jitter_result.runners
    assert r.perceptual.jod < MAX_JOD - 0.01
    assert [str(g) for g in r.gates] == [f"jod>=9.99: {r.perceptual.jod:.6g} FAIL"]
    assert jitter_result.exit_code == 1


@pytest.mark.slow
def test_without_rendering_the_textures_are_scored(bundle, clip):
    config = BenchConfig(runners=("onnx",), render="none", **FAST)
    (r,) = run_bench(bundle, clip, config).runners
    assert r.perceptual_space == "texture"
    assert r.perceptual.jod == MAX_JOD
    # the 64^2 texture fits the default 256-pixel budget unreduced
    assert (r.perceptual.height, r.perceptual.width, r.perceptual.downsample) == (64, 64, 1)


@pytest.mark.slow
def test_the_report_carries_the_jod_next_to_psnr_and_tde(jitter_result, tmp_path):
    paths = write_report(jitter_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    (runner,) = data["runners"]
    assert runner["perceptual"]["jod"] == pytest.approx(jitter_result.runners[0].perceptual.jod)
    assert runner["perceptual_space"] == "screen"
    assert data["config"]["perceptual"] == "fvvdp"
    again = load_report(tmp_path)
    assert again.runners[0].perceptual == jitter_result.runners[0].perceptual
    page = render_html(jitter_result)
    assert "Perceptual video quality" in page and "FovVideoVDP" in page


def test_a_jod_gate_without_a_perceptual_metric_is_refused():
    with pytest.raises(AvatarqError, match="gate on jod needs a perceptual metric"):
        BenchConfig(gates=("jod>=9.5",))


def test_an_unknown_perceptual_metric_is_refused():
    with pytest.raises(AvatarqError, match="perceptual metric must be one of cvvdp, fvvdp"):
        BenchConfig(perceptual="vmaf")


def test_the_perceptual_settings_round_trip_through_the_config():
    config = BenchConfig(perceptual="fvvdp", perceptual_display="standard_4k", frame_rate=60)
    again = BenchConfig.from_dict(config.to_dict())
    assert again == config
    assert again.perceptual_config().to_dict() == {
        "metric": "fvvdp",
        "display": "standard_4k",
        "fps": 60.0,
        "max_size": 256,
    }


def test_a_missing_perceptual_package_stops_the_run_before_decoding(bundle, clip, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyfvvdp", None)
    config = BenchConfig(runners=("onnx",), render="none", **FAST)
    with pytest.raises(AvatarqError, match=r"pip install 'avatarq\[perceptual\]'"):
        run_bench(bundle, clip, config)


@pytest.mark.slow
def test_the_command_line_reports_the_jod_and_gates_on_it(
    small_avatar, small_bundle, tmp_path, capsys
):
    from avatarq.cli import main

    code = main(
        [
            "bench",
            str(small_bundle),
            "--sequence",
            f"{small_avatar.capture_root}:{SEGMENT}",
            "--checkpoint",
            str(small_avatar.checkpoint),
            "--render",
            "none",
            "--perceptual",
            "fvvdp",
            "--gate",
            "jod>=9.99",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--no-ssim",
            "-o",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "FovVideoVDP 10.000 JOD (texture)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runners"][0]["gates"][0]["gate"] == "jod>=9.99"


def test_a_jod_gate_reads_no_space_so_it_needs_no_rendering_for_screen_gates():
    config = BenchConfig(
        render="none", gate_space="screen", perceptual="fvvdp", gates=("jod>=9.5", "p99_ms<=9")
    )
    assert config.gates == ("jod>=9.5", "p99_ms<=9")
