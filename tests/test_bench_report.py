"""`avatarq bench`'s report: report.json round-trips, report.html stands alone."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from avatarq.bench import BenchConfig, load_report, load_sequence, run_bench, write_report
from avatarq.bench.sequences import with_image_size
from avatarq.engines import open_runner
from avatarq.errors import AvatarqError
from conftest import SMALL_CAPTURE

SEGMENT = "E001_Jaw_Open_Brow_Raise"


class NoisyRunner:
    """Adds seeded Gaussian noise (sigma 2 in 0..255 units) to a runner's texture."""

    name = "noisy"

    def __init__(self, inner):
        self.inner, self.rng = inner, np.random.default_rng(0)

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def decode(self, z, view):
        tex, vert = self.inner.decode(z, view)
        return tex + self.rng.normal(0, 2.0, tex.shape).astype(np.float32), vert.copy()


@pytest.fixture(scope="module")
def result(small_avatar, small_bundle):
    seq = load_sequence(f"{small_avatar.capture_root}:{SEGMENT}", 16, small_avatar.checkpoint)
    seq = with_image_size(seq, (SMALL_CAPTURE.image_height, SMALL_CAPTURE.image_width))
    config = BenchConfig(resolution=(64, 42), warmup=1, iters=3, gates="psnr>=40,p99_ms<=1e6")
    runners = [open_runner(small_bundle, "onnx"), NoisyRunner(open_runner(small_bundle, "onnx"))]
    return run_bench(small_bundle, seq, config, runners=runners)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    return write_report(result, tmp_path_factory.mktemp("report"), save_figures=True)


def test_report_json_round_trips(result, written):
    loaded = load_report(written["json"])
    assert loaded.to_dict() == json.loads(written["json"].read_text())
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))


def test_report_json_is_strict_json_with_infinite_psnr_as_a_string(written):
    text = written["json"].read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    onnx = data["runners"][0]
    assert onnx["texture"]["psnr_mean"] == "Infinity"


def test_report_json_records_settings_versions_device_and_bundle(written, small_bundle):
    data = json.loads(written["json"].read_text())
    assert data["config"]["gates"] == ["psnr>=40", "p99_ms<=1e+06"]
    assert {"avatarq", "numpy", "torch", "onnxruntime", "python"} <= set(
        data["environment"]["versions"]
    )
    assert data["environment"]["cpu_count"] >= 1
    assert data["bundle"]["path"] == str(small_bundle)
    assert data["bundle"]["precision"] == "fp32"
    assert [r["name"] for r in data["runners"]] == ["onnx:model.onnx", "noisy"]
    assert data["exit_code"] == 0
    assert set(data["runners"][1]["latency_p50_ratio_vs_reference"]) == {
        "decode",
        "copy",
        "render",
        "end_to_end",
    }


def test_report_html_embeds_every_figure_as_a_png(written, result):
    page = written["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # PSNR, tDE, latency, and one frame strip per runner
    assert len(images) == 3 + len(result.runners)
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_html_states_the_verdict_and_each_gate(written):
    page = written["html"].read_text()
    assert "PASS: all 4 gate checks held for onnx:model.onnx, noisy." in page
    assert page.count("<td>psnr&gt;=40</td>") == 2


def test_the_frame_strip_shows_the_worst_frame_of_each_space(result):
    texture, screen = result.strips["noisy"]
    psnr = result.runners[1].texture.psnr_per_frame
    assert texture.space == "texture" and texture.frame == int(np.argmin(psnr))
    assert texture.reference.shape == (64, 64, 3)
    assert screen.space == "screen" and screen.mask is not None
    assert screen.reference.shape == screen.deployed.shape == screen.mask.shape + (3,)


def test_saved_figures_are_the_embedded_ones(written):
    names = sorted(p.name for p in written["figures"].iterdir())
    assert names == [
        "latency.png",
        "psnr.png",
        "strip_noisy.png",
        "strip_onnx_model.onnx.png",
        "tde.png",
    ]


def test_loading_a_missing_report_is_a_one_line_error(tmp_path):
    with pytest.raises(AvatarqError, match="bench report not found"):
        load_report(tmp_path)
