"""How much a capture helps calibration: data-free vs capture-calibrated INT8, demo avatar.

For each seed (calibration samples and optimisation), calibrates the demo avatar's decoder
(`make demo`'s settings) four ways - POCA and plain max, on the capture's samples and on
samples drawn from the latent prior (what `avatarq export --model dam.pt --int8` does with
no data) - and measures each Q/DQ graph against FP32 with ONNX Runtime on the capture's
first segment seen by its frontal camera (texture PSNR over all texels and over the texels
the camera sees, tDE, J). Prints mean and spread over seeds; with --docs, replaces the
marked block of docs/benchmarks.md.

    python benchmarks/data_free.py --seeds 0,1,2 --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

from avatarq.bench.results import environment
from avatarq.calibration import CalibrationConfig
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.train import TrainConfig
from avatarq.workflows.peers import PeerMethod, compare_calibrations, replace_marked_block

METHODS = (
    PeerMethod("POCA tau 0, capture samples + visibility", CalibrationConfig()),
    PeerMethod("POCA tau 0, data-free (prior)", CalibrationConfig(), data_free=True),
    PeerMethod("max, capture samples", CalibrationConfig(method="max")),
    PeerMethod("max, data-free (prior)", CalibrationConfig(method="max"), data_free=True),
)
METRICS = ("psnr", "psnr_visible", "tde", "tde_visible", "jitter_ratio")


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    parser.add_argument("--samples", type=int, default=64, help="random calibration samples")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (0, total):
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    avatar = make_synthetic_avatar(
        args.cache / "synth_demo", train_config=TrainConfig(), progress=say
    )
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in METRICS} for m in METHODS}
    for seed in seeds:
        study = compare_calibrations(
            avatar.checkpoint,
            avatar.capture_root,
            args.cache / f"data_free_{seed}",
            METHODS,
            n_random=args.samples,
            seed=seed,
            threads=args.threads,
            progress=say,
        )
        for row in study.rows:
            for key in METRICS:
                results[row.name][key].append(getattr(row, key))
    lines = [
        "| calibration | PSNR all texels | PSNR seen texels | tDE | tDE seen | J |",
        "|---|---|---|---|---|---|",
    ]
    for name, metrics in results.items():
        lines.append(
            f"| {name} | {_spread(metrics['psnr'], '.1f')} dB | "
            f"{_spread(metrics['psnr_visible'], '.1f')} dB | {_spread(metrics['tde'], '.2e')} | "
            f"{_spread(metrics['tde_visible'], '.2e')} | {_spread(metrics['jitter_ratio'], '.3f')} |"
        )
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    command = "python benchmarks/data_free.py " + " ".join(sys.argv[1:])
    block = "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} on {env['cpu']} "
            f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Mean ± standard "
            f"deviation over calibration seeds {args.seeds} (`{command.strip()}`).",
            "",
            *lines,
        ]
    )
    print(block)
    if args.docs is not None:
        args.docs.write_text(replace_marked_block(args.docs.read_text(), "data-free", block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
