"""Regenerate the texel-bias storage table of docs/benchmarks.md ("Low bit widths").

For each `--bias-format`, runs the three commands the table shows, exactly as a user would
(`avatarq calibrate --bits w4a8 --gptq --bias-format FMT`, `avatarq export --int8 --calib`,
`avatarq bench --runner onnx --render none` against the bundle's FP32 graph on the
capture's first segment), then reads the graph's size with `avatarq info --json` and the
texture metrics with `bench --json`. Everything is written under --workdir; with --docs the
marked block ``bias-formats`` of the file is replaced.

    python benchmarks/bias_formats.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from avatarq.bench.results import environment
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.workflows.peers import replace_marked_block

FORMATS = ("fp32", "fp16", "int8", "int4")


def avatarq(*args: str) -> str:
    """Run the avatarq CLI of this interpreter; its stdout (raises on a failed command)."""
    command = [str(Path(sys.executable).with_name("avatarq")), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def measure(fmt: str, checkpoint: Path, capture: Path, workdir: Path) -> dict[str, Any]:
    calib, bundle = workdir / f"calib_{fmt}", workdir / f"b_{fmt}.avq"
    start = time.perf_counter()
    avatarq(
        "calibrate", "--model", str(checkpoint), "--data", str(capture), "--bits", "w4a8",
        "--gptq", "--bias-format", fmt, "-o", str(calib),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    avatarq(
        "export", "--model", str(checkpoint), "--capture", str(capture), "--int8",
        "--calib", str(calib), "-o", str(bundle), "--force",
    )  # fmt: skip
    sizes = json.loads(avatarq("info", str(bundle), "--json"))["size_bytes"]
    report = json.loads(
        avatarq(
            "bench",
            str(bundle),
            "--checkpoint",
            str(checkpoint),
            "--capture",
            str(capture),
            "--runner",
            "onnx",
            "--render",
            "none",
            "--json",
            "-o",
            str(workdir / f"r_{fmt}"),
        )  # fmt: skip
    )
    texture = report["runners"][0]["texture"]
    return {
        "format": fmt,
        "model_onnx": sizes["model.onnx"],
        "ratio": sizes["fp32_initializers"] / sizes["model.onnx"],
        "psnr_mean": float(texture["psnr_mean"]),
        "psnr_min": float(texture["psnr_min"]),
        "tde": float(texture["tde"]),
        "jitter": float(texture["jitter_ratio"]),
        "calibrate_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench/bias_formats"))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)
    avatar = make_synthetic_avatar(args.cache / "synth_demo")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in args.formats.split(","):
        row = measure(fmt, avatar.checkpoint, avatar.capture_root, args.workdir)
        print(json.dumps(row), flush=True)
        rows.append(row)
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    command = "python benchmarks/bias_formats.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {env['cpu'] or platform.processor()} "
        f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Command: "
        f"`{command.strip()}`.",
        "",
        "| `--bias-format` | model.onnx | x below FP32 | texture PSNR mean (min) | tDE | J |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['model_onnx'] / 1e6:.2f} MB | {r['ratio']:.2f} "
            f"| {r['psnr_mean']:.1f} dB ({r['psnr_min']:.1f}) | {r['tde']:.2e} "
            f"| {r['jitter']:.3f} |"
        )
    block = "\n".join(lines)
    (args.workdir / "table.md").write_text(block + "\n")
    print(block)
    if args.docs is not None:
        args.docs.write_text(replace_marked_block(args.docs.read_text(), "bias-formats", block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
