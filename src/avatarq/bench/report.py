"""The report of `avatarq bench`: report.json for machines, report.html for people.

`write_report(result, out_dir)` writes

- ``report.json``: `BenchResult.to_dict()` (every number, the settings, versions, device,
  git revision; strict JSON, non-finite numbers as the strings "Infinity"/"NaN");
- ``report.html``: one self-contained page (figures are PNGs embedded as base64, no
  script, no network): the verdict, summary tables, PSNR and tDE per frame, a latency
  histogram, and per runner a strip FP32 | deployed | amplified error of its worst frame.

The figures come from `avatarq.bench.report_figures`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avatarq.bench.report_document import ReportDocument
from avatarq.bench.report_figures import compared_spaces, figures
from avatarq.bench.results import REPORT_SCHEMA_VERSION, BenchResult, RunnerResult
from avatarq.core.documents import document_dict, load_versioned_document
from avatarq.core.files import StagedDirectory, atomic_write_text, check_parent
from avatarq.errors import AvatarqError

JSON_FILE = "report.json"
HTML_FILE = "report.html"
FIGURES_DIR = "figures"


# --------------------------------------------------------------------------- json


def report_json(result: BenchResult) -> str:
    """Strict JSON text of the result (indent 2, sorted keys)."""
    return json.dumps(result.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def load_report(path: str | Path) -> BenchResult:
    """Read a report.json (or the directory holding one) back into a `BenchResult`
    (without frame strips)."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_FILE
    if not path.is_file():
        raise AvatarqError(f"bench report not found: {path}")
    document = load_versioned_document(
        path, ReportDocument, REPORT_SCHEMA_VERSION, f"bench report {path}", "rerun the bench"
    )
    return BenchResult.from_dict(document_dict(document))


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return html.escape(x)
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fidelity_rows(runners: Sequence[RunnerResult], space: str) -> list[list[str]]:
    rows = []
    for r in runners:
        c = r.texture if space == "texture" else r.screen
        if c is None:
            continue
        rows.append(
            [
                html.escape(r.name),
                _fmt(c.psnr_mean),
                _fmt(c.psnr_min),
                _fmt(c.psnr_std),
                _fmt(c.ssim_mean, 6),
                _fmt(c.tde),
                _fmt(c.tde_rms),
                _fmt(c.jitter_ratio),
                _fmt(c.flicker_excess),
                _fmt(c.t_std),
                _fmt(c.t_std_reference),
                _fmt(c.max_abs_error),
                str(c.n_frames),
                "" if r.codec is None else str(r.codec.bits_per_frame),
            ]
        )
    return rows


def _perceptual_rows(runners: Sequence[RunnerResult]) -> list[list[str]]:
    rows = []
    for r in runners:
        p = r.perceptual
        if p is None:
            continue
        rows.append(
            [
                html.escape(r.name),
                f"<b>{_fmt(p.jod)}</b>",
                html.escape(f"{p.name} {p.version}"),
                html.escape(r.perceptual_space or "-"),
                f"{p.frames} x {p.height}x{p.width}",
                str(p.downsample),
                html.escape(p.display),
                _fmt(p.fps),
                _fmt(p.seconds_per_frame, 3),
            ]
        )
    return rows


def _perceptual_section(result: BenchResult) -> list[str]:
    rows = _perceptual_rows(result.runners)
    if not rows:
        return []
    first = next(r.perceptual for r in result.runners if r.perceptual is not None)
    header = [
        "runner",
        "JOD",
        "metric",
        "space",
        "frames x HxW",
        "reduced by",
        "display",
        "fps",
        "s/frame (CPU)",
    ]
    return [
        "<p><b>Perceptual video quality</b> <span class='small'>(JOD: 10 = no visible "
        "difference from the FP32 clip, one unit less = one just-objectionable difference; "
        f"display model {html.escape(first.display)}: "
        f"{html.escape(first.display_description)})</span></p>",
        _table(header, rows),
    ]


def _latency_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    entries = [(result.reference, "FP32 reference", {})] + [
        (r, r.name, result.latency_ratios(r)) for r in result.runners
    ]
    for r, label, ratios in entries:
        for stage, s in r.latency.items():
            ratio = ratios.get(stage)
            rows.append(
                [
                    html.escape(label),
                    html.escape(r.label),
                    stage.replace("_", " "),
                    _fmt(s.p50_ms),
                    _fmt(s.p90_ms),
                    _fmt(s.p99_ms),
                    _fmt(s.mean_ms),
                    _fmt(s.frames_per_second),
                    str(s.n),
                    "-" if ratio is None else f"{ratio:.3g}x",
                ]
            )
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.verdict{font-size:1.1em;padding:.6em 1em;border-radius:6px;margin:1em 0}
.pass{background:#e6f4ea;border:1px solid #2e7d32}.fail{background:#fdecea;border:1px solid #c62828}
.info{background:#eef3fb;border:1px solid #1f5fbf}
img{max-width:100%;display:block;margin:.5em 0}
.small{color:#555;font-size:.85em}code{background:#f4f4f4;padding:0 3px}
"""


def render_html(result: BenchResult, figs: dict[str, bytes] | None = None) -> str:
    """The report page (self-contained HTML)."""
    figs = figs if figs is not None else figures(result)
    d = result.to_dict()
    has_gates = any(r.gates for r in result.runners)
    cls = ("pass" if result.passed else "fail") if has_gates else "info"
    b, s, cfg, env = d["bundle"], d["sequence"], d["config"], d["environment"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>avatarq bench: {html.escape(Path(b['path']).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>avatarq bench: {html.escape(Path(b['path']).name)}</h1>",
        f"<p class='small'>{html.escape(_family(b['arch']))}, {html.escape(b['precision'])}, "
        f"z {b['z_dim']}, texture {b['tex_size']}<sup>2</sup>, {b['n_vertices']} vertices. "
        f"Sequence: {html.escape(s['source'])}. Created {html.escape(d['created'])}, "
        f"{d['seconds']:.1f} s.</p>",
        f"<div class='verdict {cls}'>{html.escape(result.verdict())}</div>",
    ]
    if has_gates:
        rows = [
            [
                html.escape(r.name),
                html.escape(str(g.gate)),
                _fmt(g.value),
                "PASS" if g.passed else "<b>FAIL</b>",
            ]
            for r in result.runners
            for g in r.gates
        ]
        parts += [
            f"<h2>Gates</h2><p class='small'>Fidelity gates read {cfg['gate_space']}-space "
            f"metrics, latency gates the {cfg['gate_stage'].replace('_', ' ')} stage.</p>",
            _table(["runner", "gate", "value", "result"], rows),
        ]
    parts.append("<h2>Fidelity and temporal stability vs the FP32 reference</h2>")
    header = [
        "runner",
        "PSNR mean (dB)",
        "PSNR min",
        "PSNR std",
        "SSIM",
        "tDE",
        "tDE rms",
        "J",
        "FE",
        "T-Std",
        "T-Std FP32",
        "max |e|",
        "frames",
        "z bits/frame",
    ]
    for space in compared_spaces(result):
        note = (
            "decoded texture / 255, every texel"
            if space == "texture"
            else "rendered image, means over the FP32 render's foreground of each frame"
        )
        parts += [
            f"<p><b>{space} space</b> <span class='small'>({note})</span></p>",
            _table(header, _fidelity_rows(result.runners, space)),
        ]
    parts += _perceptual_section(result)
    parts += [
        f"<p class='small'>Reference: {html.escape(result.reference.label)}. "
        "tDE = mean |e<sub>t</sub> - e<sub>t-1</sub>| (0 for a constant error); "
        "J = jitter ratio in [0, 2] (0 frozen error, 1.41 temporally white, 2 sign flip "
        "every frame); FE = flicker excess, mean |Q<sub>t</sub> - Q<sub>t-1</sub>| - "
        "mean |F<sub>t</sub> - F<sub>t-1</sub>|; T-Std = mean over elements of the std over "
        "time of the frame-to-frame change Q<sub>t</sub> - Q<sub>t-1</sub> (0 for motion at "
        "constant speed; T-Std FP32: the same of F). Runners named +vq decode z after the "
        "latent codec, at the bits per frame shown. Values in [0, 1] units.</p>",
        _img(figs["psnr"], "PSNR per frame"),
        _img(figs["tde"], "tDE per frame"),
        "<h2>Latency</h2>",
        f"<p class='small'>{cfg['warmup']} warm-up and {cfg['iters']} timed iterations per "
        f"runner, batch {cfg['batch']}, "
        + ("round-robin across runners" if cfg.get("interleave") else "runner after runner")
        + "; ratios are p50 over the reference's p50 in this run. "
        + (
            "Copy and render timed with CUDA events. "
            if env.get("cuda") and result.render.get("device") == "cuda"
            else "Wall clock. "
        )
        + "</p>",
        _table(
            [
                "runner",
                "what",
                "stage",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "mean ms",
                "frames/s",
                "n",
                "vs ref",
            ],
            _latency_rows(result),
        ),
        _img(figs["latency"], "latency histogram"),
        "<h2>Worst frames: FP32 | deployed | amplified error</h2>",
        "<p class='small'>For each runner the frame with the lowest PSNR in each space; the "
        "error panel shows |Q - F| (mean over RGB) scaled so its 99.5th percentile is "
        "white.</p>",
    ]
    for name in result.strips:
        key = f"strip_{name}"
        if key in figs:
            parts += [f"<p><b>{html.escape(name)}</b></p>", _img(figs[key], f"frames {name}")]
    render = d["render"]
    render_txt = (
        f"{render['backend']} at {render['resolution'][0]}x{render['resolution'][1]} "
        f"on {render['device']}"
        if render.get("backend")
        else f"not rendered: {render.get('note', '')}"
    )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    git = env.get("git")
    git_txt = "-" if not git else git["revision"][:12] + (" (modified)" if git["dirty"] else "")
    settings = [
        ["bundle", html.escape(b["path"])],
        ["source checkpoint sha256", html.escape(b["source_checkpoint_sha256"])],
        ["calibration sha256", _fmt(b["calib_sha256"])],
        ["render", html.escape(render_txt)],
        ["runners", html.escape(", ".join(r.name for r in result.runners))],
        ["skipped", html.escape("; ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "-")],
        [
            "device",
            html.escape(
                f"{env['cpu']} ({env['cpu_count']} CPUs)"
                + (f"; GPU {env['gpu']}" if env.get("gpu") else "")
            ),
        ],
        ["versions", html.escape(versions)],
        ["avatarq git revision", html.escape(git_txt)],
        ["config", "<code>" + html.escape(json.dumps(cfg, sort_keys=True)) + "</code>"],
    ]
    parts += ["<h2>Settings</h2>", _table(["", ""], settings), "</body></html>\n"]
    return "".join(parts)


def check_report_dir(out: Path) -> None:
    """AvatarqError unless ``out`` may become a report folder: absent, empty, or a report
    avatarq wrote (it holds report.json and nothing that is not a report's)."""
    if out.exists() and not out.is_dir():
        raise AvatarqError(f"report directory {out} exists and is not a directory")
    check_parent(out)
    if out.is_dir() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if JSON_FILE not in names or not names <= {JSON_FILE, HTML_FILE, FIGURES_DIR}:
            raise AvatarqError(
                f"report directory {out} holds files that are not an avatarq report; refusing "
                "to replace it (choose a new or empty folder)"
            )


def write_report(
    result: BenchResult, out_dir: str | Path, save_figures: bool = False
) -> dict[str, Path]:
    """Write report.json and report.html as the folder ``out_dir`` (staged, then moved
    into place; an existing folder is replaced only when it holds a report or nothing).

    Args:
        result: what `run_bench` returned.
        out_dir: target directory.
        save_figures: also write each figure as ``figures/<name>.png``.

    Returns:
        {"json": path, "html": path} (plus "figures": directory when saved).
    """
    out = Path(out_dir)
    check_report_dir(out)
    figs = figures(result)
    with StagedDirectory(out, replace=True) as stage:
        atomic_write_text(stage.path / JSON_FILE, report_json(result))
        atomic_write_text(stage.path / HTML_FILE, render_html(result, figs))
        if save_figures:
            (stage.path / FIGURES_DIR).mkdir()
            for name, png in figs.items():
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                (stage.path / FIGURES_DIR / f"{safe}.png").write_bytes(png)
        stage.commit()
    paths = {"json": out / JSON_FILE, "html": out / HTML_FILE}
    if save_figures:
        paths["figures"] = out / FIGURES_DIR
    return paths


def _family(arch: str) -> str:
    if arch == "declared":
        return "declared decoder"
    return "PiCA-style decoder" if arch == "pica" else f"{arch} DAM"
