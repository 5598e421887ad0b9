"""Make (or finish, or reuse) the full-size test subject and print its record.

The subject (`avatarq.workflows.subject`): a synthetic capture with fine texture detail,
a DAM trained on it at Multiface size (texture 1024, z 256) and a held-out capture of the
same face in new motion. Cached under --cache by a key of its settings; an interrupted
training resumes from its last saved state when the command is run again.

    nice -n 10 python benchmarks/test_subject.py --cache out/bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from avatarq.workflows.subject import SubjectConfig, make_test_subject


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="cache folder")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (0, total) or done % 10 == 0:
            counted = "" if total is None else f" [{done}/{total}]"
            print(f"[{time.strftime('%H:%M:%S')}] {message}{counted}", flush=True)

    subject = make_test_subject(args.cache, SubjectConfig(), progress=say)
    say(f"test subject {subject.root} ({'reused' if subject.reused else 'made'})")
    record = {k: subject.record[k] for k in ("key", "training", "heldout")}
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
