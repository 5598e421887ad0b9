"""Regenerate the "Low bit widths" table of docs/benchmarks.md.

Makes (or reuses) the synthetic avatar, then calibrates its decoder at every bit width with
every method for every calibration-sample seed, and measures each Q/DQ graph against FP32
on one ordered clip with ONNX Runtime on the CPU (`avatarq.workflows.lowbit`); with
--peers, ONNX Runtime's quantize_static and NVIDIA ModelOpt's recipes
(`avatarq.workflows.lowbit_peers`) sit next to them. `--avatar subject` is the full-size
test subject (benchmarks/test_subject.py), evaluated on its held-out clip. Progress is
saved after every row in WORKDIR/rows.jsonl; a rerun resumes from it. Writes study.json and
table.md into the workdir and, with --docs, replaces the matching block of the file.

    python benchmarks/lowbit.py --avatar demo --docs docs/benchmarks.md
    python benchmarks/lowbit.py --bits w4a8 --methods poca,poca+gptq --seeds 0,1,2
    python benchmarks/lowbit.py --avatar subject --methods max,gptq,poca,default --peers all
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from avatarq.bench.results import environment
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.train import TrainConfig
from avatarq.workflows.lowbit import LowbitRow, LowbitStudy, default_methods, lowbit_study
from avatarq.workflows.lowbit_peers import default_peers
from avatarq.workflows.peers import replace_marked_block
from avatarq.workflows.subject import make_test_subject

AVATARS = {"demo": TrainConfig(), "full": TrainConfig(z_dim=256, tex_size=1024, iters=800)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatar", choices=[*sorted(AVATARS), "subject"], default="demo")
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--workdir", type=Path, default=None, help="default: CACHE/lowbit_AVATAR")
    parser.add_argument("--bits", default="w8a8,w6a6,w4a8,w4a4,fp8")
    parser.add_argument("--methods", default=None, help="comma list of method names (default all)")
    parser.add_argument(
        "--peers", default="", help="comma list of peers (ort-minmax, modelopt-...) or all"
    )
    parser.add_argument("--seeds", default="0,1,2", help="calibration-sample seeds")
    parser.add_argument("--samples", type=int, default=64, help="random calibration samples")
    parser.add_argument("--frames", type=int, default=32, help="frames of the evaluation clip")
    parser.add_argument("--iters", type=int, default=100, help="POCA iterations per layer")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--holdout", choices=("frames", "segment", "none"), default="frames")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    parser.add_argument(
        "--key", default=None, help="marked block to replace (default lowbit-AVATAR)"
    )
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if not done:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    clip = None
    if args.avatar == "subject":
        avatar = make_test_subject(args.cache, progress=say)
        clip = avatar.heldout_sequence(max_frames=args.frames)
    else:
        avatar = make_synthetic_avatar(
            args.cache / f"synth_{args.avatar}", train_config=AVATARS[args.avatar], progress=say
        )
    peers = default_peers()
    if args.peers != "all":
        known_peers = {p.name: p for p in peers}
        wanted_peers = [p for p in args.peers.split(",") if p]
        unknown = [p for p in wanted_peers if p not in known_peers]
        if unknown:
            parser.error(f"unknown peer {unknown[0]!r}; known: {', '.join(known_peers)}")
        peers = [known_peers[p] for p in wanted_peers]
    workdir = args.workdir or args.cache / f"lowbit_{args.avatar}"
    workdir.mkdir(parents=True, exist_ok=True)
    methods = default_methods(args.iters)
    if args.methods:
        wanted = args.methods.split(",")
        known = {m.name: m for m in methods}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            parser.error(f"unknown method {unknown[0]!r}; known: {', '.join(known)}")
        methods = [known[w] for w in wanted]
    progress = workdir / "rows.jsonl"
    done = None
    if progress.is_file():
        rows = [LowbitRow(**json.loads(line)) for line in progress.read_text().splitlines() if line]
        done = LowbitStudy(rows)
        say(f"resuming: {len(rows)} rows in {progress}")

    def save(row: LowbitRow) -> None:
        with progress.open("a") as f:
            f.write(json.dumps(row.__dict__, default=str) + "\n")

    bits = [b for b in args.bits.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    study = lowbit_study(
        avatar.checkpoint,
        avatar.capture_root,
        workdir,
        bits,
        methods,
        seeds,
        n_random=args.samples,
        max_frames=args.frames,
        threads=args.threads,
        progress=say,
        done=done,
        on_row=save,
        holdout=args.holdout,
        clip=clip,
        peers=peers,
    )
    wanted_rows = {(b, m.name) for b in bits for m in [*methods, *peers]}
    study.rows = [r for r in study.rows if (r.bits, r.method) in wanted_rows and r.seed in seeds]
    (workdir / "study.json").write_text(study.to_json())
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    model = study.setup["model"]
    command = "python benchmarks/lowbit.py " + " ".join(a for a in sys.argv[1:] if a)
    table = study.markdown(study.setup.get("fp32_bytes"))
    block = "\n".join(
        [
            f"Avatar `{args.avatar}`: {model['arch']} DAM, z {model['z_dim']}, texture "
            f"{model['tex_size']}^2, {model['n_vertices']} vertices. Calibration: "
            f"{args.samples} random (frame, camera) samples + 2 clips of 8 frames per seed, "
            + (
                f"drawn from the {study.setup['samples']['frames']} odd frames of the capture "
                f"(holdout {args.holdout})"
                if clip is None
                else f"drawn from all {study.setup['samples']['frames']} frames of the "
                "training capture"
            )
            + f", seeds {', '.join(map(str, seeds))}. Clip: "
            f"{study.setup['clip']['source']} "
            f"({study.setup['clip']['frames']} frames). ONNX Runtime CPU, {args.threads} "
            "threads. Cells: mean [min..max] over the seeds; model.onnx with the FP32 size "
            f"ratio ({study.setup.get('fp32_bytes', 0) / 1e6:.2f} MB FP32).",
            "",
            f"Measured {datetime.date.today().isoformat()} on {env['cpu'] or platform.processor()} "
            f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Command: `{command}`.",
            "",
            table,
        ]
    )
    (workdir / "table.md").write_text(block + "\n")
    print(block)
    if args.docs is not None:
        text = args.docs.read_text() if args.docs.is_file() else ""
        key = args.key or f"lowbit-{args.avatar}"
        args.docs.write_text(replace_marked_block(text, key, block))
        say(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
