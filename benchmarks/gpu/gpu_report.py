"""The GPU check's outputs: one JSON document and the markdown of docs/benchmarks.md
section 5, rendered from that JSON alone (so a JSON from any machine can be re-rendered)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

SCHEMA = 1
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"

FETCH_COMMAND = "python benchmarks/gpu/check.py --fetch-wheels WHEELS --python-version 3.12"
RUN_COMMAND = "python benchmarks/gpu/check.py --wheels WHEELS --out OUT"


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "Infinity", "-Infinity", "NaN"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps(document: Any) -> str:
    return json.dumps(_plain(document), indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _part(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next((p for p in report["parts"] if p["name"] == name), {})


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def _db(value: Any) -> str:
    return "exact" if value in ("Infinity", float("inf")) else f"{value} dB"


def _fidelity(row: dict[str, Any]) -> str:
    """Texture PSNR of the row's output: FP16 against FP32, engines against ORT CPU."""
    if "psnr_vs_fp32_db" in row:
        return f"{_db(row['psnr_vs_fp32_db'])} vs torch FP32"
    if "psnr_vs_reference_db" in row:
        return f"{_db(row['psnr_vs_reference_db'])} vs ORT CPU"
    return "-"


def _fps(row: dict[str, Any]) -> str:
    return f"{row['fps']:.1f}" if isinstance(row.get("fps"), (int, float)) else "-"


def machine_line(report: dict[str, Any]) -> str:
    gpu, versions, machine = report["gpu"], report["versions"], report["machine"]
    software = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    cpu = f"{machine.get('cpu_count', '?')} CPUs ({machine.get('cpu', 'unknown CPU')})"
    if not gpu.get("available"):
        return f"Machine: no CUDA GPU ({gpu.get('why', 'unknown')}); {cpu}. Software: {software}."
    return (
        f"Machine: {gpu['name']} (compute capability {gpu['capability']}, "
        f"{gpu['memory_gib']} GiB), driver {gpu.get('driver') or 'unknown'}, CUDA "
        f"{gpu.get('torch_cuda')} (torch), cuDNN {gpu.get('cudnn')}; {cpu}. Software: {software}."
    )


def results_markdown(report: dict[str, Any]) -> str:
    """The measured part of section 5 (what ``--docs`` puts between the markers)."""
    lines: list[str] = []
    date = report["date"]
    if report["dry_run"]:
        lines += [
            f"**No GPU numbers have been recorded yet.** Last run: a dry run on {date} "
            f"({report['dry_run_reason']}); every part says what it skipped and why.",
            "",
            machine_line(report),
            "",
        ]
        would_run = _part(report, "pytest-gpu").get("results", {}).get("would_run")
        if would_run is not None:
            lines += [f"`pytest -m gpu` would run {len(would_run)} tests here.", ""]
    else:
        lines += [
            f"Measured {date}. {machine_line(report)} Command: `{report['command']}`; the "
            f"check took {report['seconds']:.0f} s of its {report['budget_s']:.0f} s budget.",
            "",
        ]
        lines += _tests(report) + _decode(report) + _render(report)
    lines += ["Parts of the check:", ""]
    rows = [
        [p["name"], p["status"], p.get("seconds"), p.get("reason") or ""] for p in report["parts"]
    ]
    lines += _table(["part", "status", "seconds", "reason"], rows)
    return "\n".join(lines).rstrip() + "\n"


def _tests(report: dict[str, Any]) -> list[str]:
    part = _part(report, "pytest-gpu")
    summary = part.get("results", {}).get("summary")
    if not summary:
        return []
    lines = [
        "### GPU-marked tests",
        "",
        f"`pytest -m gpu`: {summary['passed']} passed, {summary['failed']} failed, "
        f"{summary['errors']} errors, {summary['skipped']} skipped in {part.get('seconds')} s.",
        "",
    ]
    notable = [t for t in part["results"].get("tests", []) if t["outcome"] != "passed"]
    if notable:
        rows = [[t["test"], t["outcome"], t.get("message", "")] for t in notable]
        lines += _table(["test", "outcome", "message"], rows)
    return lines


def _decode(report: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("torch-decode", "ort-cuda", "tensorrt", "tensorrt-rtx"):
        rows += _part(report, name).get("results", {}).get("rows", [])
    if not rows:
        return []
    lines = [
        "### Decoder latency",
        "",
        "Full-size base DAM (z 256, texture 1024^2, 7306 vertices), random weights; "
        'milliseconds per batch. I/O "device": inputs and outputs stay on the GPU; '
        '"host": numpy in and out through avatarq\'s runner, copies included. '
        'Clock "events": CUDA events; "wall": perf_counter with a device synchronize.',
        "",
    ]
    table = [
        [
            r.get("runtime"),
            r.get("precision"),
            r.get("mode"),
            r.get("io"),
            r.get("batch"),
            _ms(r, "p50_ms"),
            _ms(r, "p90_ms"),
            _ms(r, "p99_ms"),
            _fps(r),
            r.get("clock"),
            r.get("skipped") or _fidelity(r),
        ]
        for r in rows
    ]
    header = ["runtime", "precision", "mode", "I/O", "batch", "p50 ms", "p90 ms", "p99 ms"]
    lines += _table(header + ["frames/s", "clock", "fidelity / skipped"], table)
    builds = []
    for name in ("tensorrt", "tensorrt-rtx"):
        for b in _part(report, name).get("results", {}).get("builds", []):
            builds.append(
                [
                    name,
                    b["precision"],
                    b.get("seconds"),
                    b.get("mib"),
                    b.get("target"),
                    b.get("skipped", ""),
                ]
            )
    if builds:
        lines += ["Engine builds:", ""]
        lines += _table(["backend", "precision", "build s", "MiB", "target", "skipped"], builds)
    return lines


def _render(report: dict[str, Any]) -> list[str]:
    build = _part(report, "nvdiffrast-build")
    part = _part(report, "nvdiffrast-render")
    rows = part.get("results", {}).get("rows", [])
    if not rows and build.get("status") != "ok":
        return []
    lines = ["### nvdiffrast render", ""]
    if build.get("status") == "ok":
        lines += [
            f"Plugin: first rasterization after "
            f"{build['results']['seconds_to_first_raster']} s (JIT build, or its cache).",
            "",
        ]
    scene = part.get("results", {}).get("scene")
    if scene:
        lines += [
            f"Scene: a {scene['vertices']}-vertex head mesh ({scene['triangles']} triangles) "
            f"with a {scene['texture']}^2 texture at {scene['resolution'][0]}x"
            f"{scene['resolution'][1]} (H x W), camera as in a Multiface capture. "
            '"render" = rasterize, UV interpolation, bilinear texture lookup and mask; '
            'CUDA events, milliseconds per batch; "covered": share of pixels on the head.',
            "",
        ]
    table = [
        [
            r.get("mode"),
            r.get("batch"),
            _ms(r, "p50_ms"),
            _ms(r, "p90_ms"),
            _ms(r, "p99_ms"),
            _fps(r),
            r.get("coverage"),
            r.get("skipped", ""),
        ]
        for r in rows
    ]
    if table:
        header = ["mode", "batch", "p50 ms", "p90 ms", "p99 ms", "frames/s", "covered", "skipped"]
        lines += _table(header, table)
    return lines


def section_markdown(report: dict[str, Any]) -> str:
    """docs/benchmarks.md section 5 as a whole: heading, how to regenerate, the results."""
    head = [
        "## 5. GPU",
        "",
        "`benchmarks/gpu/check.py` checks every GPU path of avatarq in one run of under 8 "
        "minutes: the GPU-marked tests, the nvdiffrast plugin and render latency, and decode "
        "latency with torch (FP32, FP16, CUDA graphs), the ONNX Runtime CUDA provider and "
        "any TensorRT runtime present. Fetch its wheels where the package index is "
        "reachable, then run it on the GPU machine (no network needed there):",
        "",
        "```sh",
        FETCH_COMMAND,
        RUN_COMMAND,
        "```",
        "",
        BEGIN,
    ]
    return "\n".join(head) + "\n" + results_markdown(report) + END + "\n"


def replace_block(text: str, report: dict[str, Any]) -> str:
    """``text`` with the block between the gpu-check markers replaced by the results."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} block in the file")
    block = BEGIN + "\n" + results_markdown(report) + END
    return pattern.sub(lambda _m: block, text, count=1)
