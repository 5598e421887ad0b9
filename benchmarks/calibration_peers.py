"""Regenerate the calibration comparison of docs/benchmarks.md (section 6).

Makes (or reuses) a synthetic avatar, then quantizes its decoder with ONNX Runtime's
quantize_static (MinMax, Entropy, MinMax restricted to avatarq's layers), avatarq max
calibration, POCA at several tau and POCA with the temporal term, all on the same
calibration samples, and measures each INT8 Q/DQ graph against FP32 on one ordered clip
with ONNX Runtime on the CPU. Writes study.json and table.md into --workdir and, with
--docs, replaces the matching block of docs/benchmarks.md.

    python benchmarks/calibration_peers.py --avatar demo --docs docs/benchmarks.md
    python benchmarks/calibration_peers.py --avatar full --docs docs/benchmarks.md

"demo" is `make demo`'s avatar (texture 256, z 64, 400 training steps); "full" is the
Multiface size (texture 1024, z 256) trained 800 steps: about 30 minutes of training on a
2-core CPU the first time, then cached. "subject" is the full-size test subject
(`avatarq.workflows.subject`: fine texture detail; made by benchmarks/test_subject.py, or
here on first use), evaluated on its held-out clip, which no calibration frame comes from.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

from avatarq.bench.results import environment
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.train import TrainConfig
from avatarq.workflows.peers import compare_calibrations, default_methods, replace_marked_block
from avatarq.workflows.subject import SubjectConfig, make_test_subject

AVATARS = {
    "demo": TrainConfig(),
    "full": TrainConfig(z_dim=256, tex_size=1024, iters=800),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatar", choices=[*sorted(AVATARS), "subject"], default="demo")
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--workdir", type=Path, default=None, help="default: CACHE/peers_AVATAR")
    parser.add_argument("--samples", type=int, default=64, help="random calibration samples")
    parser.add_argument("--frames", type=int, default=32, help="frames of the evaluation clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--taus", default="0.9,0.5,0.2,0", help="POCA tau sweep")
    parser.add_argument("--temporal-weights", default="0.25,1", help="POCA tau 0 + temporal")
    parser.add_argument("--iters", type=int, default=100, help="POCA iterations per layer")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (0, total) or done % max(1, total // 10) == 0:
            counted = "" if total is None else f" [{done}/{total}]"
            print(f"[{time.strftime('%H:%M:%S')}] {message}{counted}", flush=True)

    clip = None
    if args.avatar == "subject":
        subject_config = SubjectConfig()
        train = subject_config.train
        avatar = make_test_subject(args.cache, subject_config, progress=say)
        clip = avatar.heldout_sequence(max_frames=args.frames)
    else:
        train = AVATARS[args.avatar]
        avatar = make_synthetic_avatar(
            args.cache / f"synth_{args.avatar}", train_config=train, progress=say
        )
    workdir = args.workdir or args.cache / f"peers_{args.avatar}"
    methods = default_methods(
        taus=[float(t) for t in args.taus.split(",") if t],
        temporal_weights=[float(w) for w in args.temporal_weights.split(",") if w],
        iters=args.iters,
    )
    study = compare_calibrations(
        avatar.checkpoint,
        avatar.capture_root,
        workdir,
        methods,
        n_random=args.samples,
        seed=args.seed,
        max_frames=args.frames,
        threads=args.threads,
        progress=say,
        clip=clip,
    )
    (workdir / "study.json").write_text(study.to_json())
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    model = study.setup["model"]
    command = "python benchmarks/calibration_peers.py " + " ".join(a for a in sys.argv[1:] if a)
    block = "\n".join(
        [
            f"Avatar `{args.avatar}`: {model['arch']} DAM, z {model['z_dim']}, texture "
            f"{model['tex_size']}^2, {model['n_vertices']} vertices, trained {train.iters} "
            f"steps on the synthetic capture. Calibration: {study.setup['samples']['count']} "
            f"samples (seed {args.seed}). Clip: {study.setup['clip']['source']}. "
            f"W8A8, ONNX Runtime CPU, {args.threads} threads. POCA times include the "
            f"visibility masks ({study.setup['visibility_mask_seconds']:.0f} s, rasterized "
            "once on the CPU and shared by every POCA row).",
            "",
            f"Measured {datetime.date.today().isoformat()} on {env['cpu']} "
            f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Command: "
            f"`{command.strip()}`.",
            "",
            study.markdown(),
        ]
    )
    (workdir / "table.md").write_text(block + "\n")
    print(block)
    if args.docs is not None:
        args.docs.write_text(replace_marked_block(args.docs.read_text(), args.avatar, block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
