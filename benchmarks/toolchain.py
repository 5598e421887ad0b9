"""Wall time of the full-size toolchain: `avatarq calibrate` + `avatarq export --int8`.

Makes (or reuses) a full-size synthetic avatar (capture texture 1024, DAM z 256, texture
1024; trained for ``--train-iters`` steps only, since the toolchain's time does not depend on
how well the decoder is trained), then runs, each as its own process exactly as a user types
it, with ``--json``:

    avatarq calibrate --model dam.pt --data CAPTURE -o calib --force --json
    avatarq export --model dam.pt --capture CAPTURE --int8 --calib calib -o int8.avq --force --json

and reports each command's wall time (process start to exit, imports included) and the
seconds per phase its ``--json`` states; the load average before and after says how idle the
machine was. With --docs, replaces the marked block "toolchain" of docs/benchmarks.md.

    python benchmarks/toolchain.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from avatarq.bench.results import environment
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.train import TrainConfig
from avatarq.models.checkpoint import load_checkpoint
from avatarq.workflows.peers import replace_marked_block


def _run(args: list[str]) -> tuple[float, dict]:
    """(wall seconds, the command's --json record) of ``avatarq ARGS`` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "avatarq"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"avatarq {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return wall, json.loads(done.stdout)


def _phases(seconds: dict[str, float]) -> str:
    shown = sorted(((k, v) for k, v in seconds.items() if k != "total"), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.1f}" for k, v in shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--train-iters", type=int, default=2, help="training steps of the DAM")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (0, total):
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    train = TrainConfig(z_dim=256, tex_size=1024, iters=args.train_iters)
    avatar = make_synthetic_avatar(
        args.cache / f"synth_full_{args.train_iters}", train_config=train, progress=say
    )
    work = args.cache / "toolchain"
    work.mkdir(parents=True, exist_ok=True)
    model, capture = str(avatar.checkpoint), str(avatar.capture_root)
    n_vertices = load_checkpoint(avatar.checkpoint).config.n_vertices
    load_before = os.getloadavg()[0]
    say("calibrate")
    calib_wall, calib = _run(
        ["calibrate", "--model", model, "--data", capture, "-o", str(work / "calib")]
        + ["--force", "--json"]
    )
    say("export")
    export_wall, export = _run(
        ["export", "--model", model, "--capture", capture, "--int8", "--calib"]
        + [str(work / "calib"), "-o", str(work / "int8.avq"), "--force", "--json"]
    )
    load_after = os.getloadavg()[0]
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    command = "python benchmarks/toolchain.py " + " ".join(sys.argv[1:] if argv is None else argv)
    validation = export.get("validation") or {}
    block = "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} on {env['cpu']} "
            f"({env['cpu_count']} CPUs, {platform.system()}); {versions}; load average "
            f"{load_before:.1f} before, {load_after:.1f} after (`{command.strip()}`). "
            f"Decoder: DAM z 256, texture 1024, {n_vertices} vertices; "
            f"{calib.get('samples', '')}.",
            "",
            "| command | wall s | seconds by phase (the command's --json) |",
            "|---|---|---|",
            f"| `avatarq calibrate --data CAPTURE` | {calib_wall:.1f} | "
            f"{_phases(calib['seconds'])} |",
            f"| `avatarq export --capture CAPTURE --int8 --calib` | {export_wall:.1f} | "
            f"{_phases(export['seconds'])} |",
            f"| both | {calib_wall + export_wall:.1f} | |",
            "",
            f"Export validation vs the torch fake-quant model: PSNR "
            f"{validation.get('texture_psnr_db', float('nan')):.1f} dB over "
            f"{validation.get('n_samples', 0)} samples.",
        ]
    )
    print(block)
    if args.docs is not None:
        args.docs.write_text(replace_marked_block(args.docs.read_text(), "toolchain", block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
