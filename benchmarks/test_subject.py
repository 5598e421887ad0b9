"""Make (or finish, or reuse) the full-size test subject and print its record.

The subject (`avatarq.workflows.subject`): a synthetic capture with fine texture detail,
a DAM trained on it at Multiface size (texture 1024, z 256) and a held-out capture of the
same face in new motion. Cached under --cache by a key of its settings; an interrupted
training resumes from its last saved state when the command is run again. With --docs the
marked block of docs/benchmarks.md is replaced by the record's summary.

    nice -n 10 python benchmarks/test_subject.py --cache out/bench --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from avatarq.bench.results import environment
from avatarq.workflows.subject import SubjectConfig, make_test_subject, training_status

BEGIN, END = "<!-- test-subject:begin -->", "<!-- test-subject:end -->"


def markdown(record: dict[str, Any], command: str) -> str:
    """The docs block: recipe, training curve against the mean-texture loss, held-out loss."""
    s, t, h = record["settings"], record["training"], record["heldout"]
    cap, train, held = s["capture"], s["train"], s["heldout"]
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    curve = " | ".join(
        f"{c['steps'][0]}-{c['steps'][1]}: {c['texture_loss']:.3f}" for c in t["curve"]
    )
    return "\n".join(
        [
            f"Subject `{record['key']}`: capture texture {cap['texture_size']}^2, detail "
            f"`{cap.get('detail', 'standard')}`, {cap['n_cameras']} cameras, segments "
            f"{cap['segment_frames']} frames, {cap['camera_textures_per_frame']} camera "
            f"textures per frame, seed {cap['seed']}; DAM `{train['arch']}` z "
            f"{train['z_dim']}, texture {train['tex_size']}, {train['iters']} steps of batch "
            f"{train['batch']} (Adam, lr {train['lr']:g} cosine-decayed), "
            f"{t['seconds'] / 60:.0f} min of training on {env['cpu']} ({env['cpu_count']} "
            "CPUs, shared with other jobs). Held-out clip: motion seed "
            f"{held['motion_seed']}, {held['segment_frames'][0]} frames.",
            "",
            "| texture loss (normalized units, seen texels) | value |",
            "|---|---|",
            f"| predicting the per-texel mean of the training targets | "
            f"{t['mean_texture_loss']:.4f} |",
            f"| trained model, first step | {t['first_texture_loss']:.4f} |",
            f"| trained model, last tenth of the steps (training samples) | "
            f"{t['final_texture_loss']:.4f} (ratio {t['texture_loss_ratio']:.3f}) |",
            f"| trained model on the held-out clip ({h['samples']} camera textures) | "
            f"{h['texture_loss']:.4f} |",
            f"| held-out clip: predicting the training capture's mean texture | "
            f"{h['training_mean_texture_loss']:.4f} |",
            f"| held-out clip: predicting the per-texel mean of its own targets | "
            f"{h['heldout_mean_texture_loss']:.4f} |",
            "",
            f"Training curve (mean texture loss per window of steps): {curve}.",
            "",
            f"Measured {datetime.date.today().isoformat()} ({platform.system()}); {versions}. "
            f"Command: `{command}`.",
        ]
    )


def status_markdown(status: dict[str, Any], command: str) -> str:
    """The docs block while the training is unfinished: where it stands."""
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    curve = " | ".join(
        f"{c['steps'][0]}-{c['steps'][1]}: {c['texture_loss']:.3f}" for c in status["curve"]
    )
    config = SubjectConfig()
    return "\n".join(
        [
            f"**Training unfinished**: {status['steps']} of {status['iters']} steps saved "
            f"({status['seconds'] / 60:.0f} min on {env['cpu']}, {env['cpu_count']} CPUs shared "
            f"with other jobs), subject `{config.key()}`. Texture loss (normalized units, seen "
            f"texels) over the last tenth of the steps: {status['final_texture_loss']:.4f}; "
            f"predicting the per-texel mean of the training targets: "
            f"{status['mean_texture_loss']:.4f} (ratio {status['texture_loss_ratio']:.3f}). "
            "Rerunning the command resumes the training and replaces this block with the "
            "finished record (training curve, held-out loss).",
            "",
            f"Training curve so far (mean texture loss per window of steps): {curve}.",
            "",
            f"Measured {datetime.date.today().isoformat()} ({platform.system()}); {versions}. "
            f"Command: `{command}`.",
        ]
    )


def _replace_block(docs: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    text = docs.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{docs} has no {BEGIN} block")
    docs.write_text(pattern.sub(lambda _m: block, text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="cache folder")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    parser.add_argument(
        "--status", action="store_true", help="print where the training stands; train nothing"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/test_subject.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.status:
        status = training_status(args.cache)
        print(json.dumps(status, indent=2))
        if args.docs is not None and not status["finished"]:
            _replace_block(args.docs, status_markdown(status, command.strip()))
        return 0

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (0, total) or done % 10 == 0:
            counted = "" if total is None else f" [{done}/{total}]"
            print(f"[{time.strftime('%H:%M:%S')}] {message}{counted}", flush=True)

    subject = make_test_subject(args.cache, SubjectConfig(), progress=say)
    say(f"test subject {subject.root} ({'reused' if subject.reused else 'made'})")
    print(json.dumps({k: subject.record[k] for k in ("key", "training", "heldout")}, indent=2))
    if args.docs is not None:
        _replace_block(args.docs, markdown(subject.record, "nice -n 10 " + command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
