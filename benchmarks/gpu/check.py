"""One-shot GPU check of avatarq: install the given wheels, run every GPU-marked test and
the GPU benchmarks, write one JSON and the markdown of docs/benchmarks.md section 5.

On the GPU machine (PyTorch with CUDA; no network needed):

    python benchmarks/gpu/check.py --wheels WHEELS --out OUT

Beforehand, where the package index is reachable (wheels for the GPU machine's Python):

    python benchmarks/gpu/check.py --fetch-wheels WHEELS --python-version 3.12

Parts, in order (gpu_plan.py; each in its own process with its own budget, the whole run under
a global deadline that skips what no longer fits, with the reason): wheels, environment,
torch-decode, nvdiffrast-build, nvdiffrast-render, pytest-gpu, bundles, ort-cuda, tensorrt,
tensorrt-rtx. Without CUDA, or with --dry-run, it runs in seconds: every part after the
environment is skipped, and its record says why and what else it would need.

Writes OUT/gpu_check.json, OUT/gpu_check.md (section 5, ready to paste) and
OUT/gpu_check.log (every part's output). Exit code 0 when no part failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import gpu_plan as plan  # noqa: E402
import gpu_report as report  # noqa: E402
import gpu_wheels as wheels  # noqa: E402

WORKER = HERE / "gpu_worker.py"


class Check:
    """One run: its folders, deadline, environment variables and part records."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.deadline = time.monotonic() + args.budget
        self.records: dict[str, dict[str, Any]] = {}
        self.env_info: dict[str, Any] = {}
        (work / "results").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = args.out / "gpu_check.log"
        self.log_path.write_text("")
        self.site = work / "site"
        self.environ = dict(os.environ)
        paths = [str(REPO / "src"), self.environ.get("PYTHONPATH", "")]
        self.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        # ninja and other console scripts installed beside this interpreter.
        self.environ["PATH"] = os.pathsep.join(
            [str(Path(sys.executable).parent), self.environ.get("PATH", "")]
        )
        self.environ["PYTHONUNBUFFERED"] = "1"

    def say(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as fh:
            fh.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part_timeout(self, spec: plan.PartSpec) -> float | str:
        """Seconds the part may take, or why it cannot start."""
        left = self.left() - plan.RESERVE_S
        if left < plan.MIN_PART_S:
            return (
                f"global deadline: {max(left, 0):.0f} s left of the {self.args.budget:.0f} s "
                f"budget (--budget)"
            )
        return float(min(spec.budget_s, left))

    # ----------------------------------------------------------------------- running

    def _spawn(self, name: str, command: list[str], timeout: float) -> tuple[int | None, float]:
        """Run a command in its own process group; kill the group at ``timeout``.
        Returns (exit code or None when killed, seconds)."""
        log = self.work / "logs" / f"{name}.log"
        start = time.monotonic()
        with log.open("w") as fh:
            proc = subprocess.Popen(
                command,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.environ,
                cwd=REPO,
                start_new_session=True,
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        return code, time.monotonic() - start

    def run_worker(self, spec: plan.PartSpec, timeout: float) -> dict[str, Any]:
        result = self.work / "results" / f"{spec.name}.json"
        args = self.args
        command = [
            sys.executable,
            str(WORKER),
            spec.name,
            "--work",
            str(self.work),
            "--result",
            str(result),
            "--seconds",
            f"{timeout:.0f}",
            "--warmup",
            str(args.warmup),
            "--iters",
            str(args.iters),
            "--measure-seconds",
            str(args.measure_seconds),
        ]
        code, seconds = self._spawn(spec.name, command, timeout)
        record = json.loads(result.read_text()) if result.is_file() else {}
        record.setdefault("results", {})
        record["seconds"] = round(seconds, 1)
        if code is None:
            record["status"] = "timed_out"
            record["reason"] = f"killed at its {round(timeout, 1):g} s budget; results so far kept"
        elif record.get("status") in (None, "running"):
            record["status"] = "failed"
            record["reason"] = f"exit code {code}: {self._last_line(spec.name)}"
        return record

    def _last_line(self, name: str) -> str:
        lines = (self.work / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        lines = [ln.strip() for ln in lines if ln.strip()]
        return (lines[-1] if lines else "no output")[:300]

    def run_pytest(self, timeout: float, collect_only: bool = False) -> dict[str, Any]:
        """``pytest -m gpu`` over the repository's tests (collection only in a dry run)."""
        junit = self.work / "pytest-gpu.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(REPO / "tests"),
        ]
        command += ["--collect-only"] if collect_only else ["--junitxml", str(junit), "-rs"]
        name = "pytest-gpu-collect" if collect_only else "pytest-gpu"
        code, seconds = self._spawn(name, command, timeout)
        log = (self.work / "logs" / f"{name}.log").read_text(errors="replace")
        if collect_only:
            tests = [ln.strip() for ln in log.splitlines() if "::" in ln and " " not in ln.strip()]
            return {"would_run": tests, "collect_exit_code": code}
        record: dict[str, Any] = {"seconds": round(seconds, 1), "results": {}}
        if junit.is_file():
            record["results"] = parse_junit(junit)
        summary = record["results"].get("summary")
        if code is None:
            record.update(
                status="timed_out", reason=f"killed at its {round(timeout, 1):g} s budget"
            )
        elif summary is None:
            record.update(status="failed", reason=f"pytest exit code {code}, no report")
        elif summary["failed"] or summary["errors"]:
            record.update(
                status="failed",
                reason=f"{summary['failed']} failed, {summary['errors']} errors of {summary['tests']}",
            )
        else:
            record.update(status="ok", reason="")
        return record

    def collect_logs(self) -> None:
        with self.log_path.open("a") as fh:
            for log in sorted((self.work / "logs").glob("*.log")):
                fh.write(f"\n===== {log.stem} =====\n")
                fh.write(log.read_text(errors="replace"))


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes (with the first line of any message) of a JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = []
    for case in (c for s in suites for c in s.iter("testcase")):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = node.get("message") or node.text or ""
                message = (text.strip().splitlines() or [""])[0][:300]
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tests.append({"test": name, "outcome": outcome, "message": message})
    count = {
        o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")
    }
    summary = {
        "tests": len(tests),
        "passed": count["passed"],
        "failed": count["failed"],
        "errors": count["error"],
        "skipped": count["skipped"],
    }
    return {"summary": summary, "tests": tests}


# --------------------------------------------------------------------------- main


def run_check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    check = Check(args, work)
    started = time.monotonic()
    selected = tuple(args.parts)
    check.say(f"GPU check: budget {args.budget:.0f} s, work folder {work}")

    def record(spec: plan.PartSpec, rec: dict[str, Any]) -> None:
        rec = {"name": spec.name, "title": spec.title, "budget_s": spec.budget_s, **rec}
        rec.setdefault("reason", "")
        rec.setdefault("results", {})
        check.records[spec.name] = rec
        check.say(
            f"{spec.name}: {rec['status']}" + (f" ({rec['reason']})" if rec["reason"] else "")
        )

    wheels_spec, env_spec, *rest = plan.PARTS
    if args.wheels is None:
        record(
            wheels_spec,
            {
                "status": "skipped",
                "reason": "no --wheels folder given: the machine's own packages are used",
            },
        )
    else:
        rec = wheels.install(args.wheels, check.site, wheels_spec.budget_s, dry_run=args.dry_run)
        if rec["status"] == "ok" or (check.site.is_dir() and any(check.site.iterdir())):
            check.environ["PYTHONPATH"] = os.pathsep.join(
                [str(check.site), check.environ["PYTHONPATH"]]
            )
        record(wheels_spec, rec)

    timeout = check.part_timeout(env_spec)
    env_record = check.run_worker(env_spec, timeout if isinstance(timeout, float) else 30.0)
    record(env_spec, env_record)
    env = env_record.get("results", {}) if env_record["status"] == "ok" else {}
    check.env_info = env
    dry = plan.dry_run_reason(args.dry_run, env)
    if env_record["status"] != "ok":
        dry = f"the environment probe {env_record['status']}: {env_record['reason']}"

    for spec in rest:
        reason = plan.skip_reason(spec, env, check.records, selected, dry)
        if reason is None:
            timeout = check.part_timeout(spec)
            if isinstance(timeout, str):
                reason = timeout
        if reason is not None:
            rec: dict[str, Any] = {"status": "skipped", "reason": reason}
            if spec.kind == "pytest" and dry and spec.name in selected:
                rec["results"] = check.run_pytest(min(60.0, max(check.left(), 1.0)), True)
            record(spec, rec)
            continue
        check.say(f"{spec.name}: starting ({spec.title}; up to {timeout:.0f} s)")
        if spec.kind == "pytest":
            record(spec, check.run_pytest(timeout))
        else:
            record(spec, check.run_worker(spec, timeout))

    check.collect_logs()
    return assemble(args, check, dry, time.monotonic() - started)


PATH_OPTIONS = ("--out", "--work", "--wheels", "--docs", "--fetch-wheels")


def command_line(argv: list[str]) -> str:
    """The command as run, with folder and file arguments written as placeholders (OUT,
    WHEELS, ...) so the line can go into documentation as is."""

    def placeholder(option: str) -> str:
        return option.lstrip("-").upper().replace("-", "_")

    words: list[str] = []
    for i, word in enumerate(argv):
        option = word.split("=", 1)[0]
        if option in PATH_OPTIONS and "=" in word:
            words.append(f"{option}={placeholder(option)}")
        elif i > 0 and argv[i - 1] in PATH_OPTIONS:
            words.append(placeholder(argv[i - 1]))
        else:
            words.append(word)
    return "python benchmarks/gpu/check.py " + shlex.join(words)


def assemble(
    args: argparse.Namespace, check: Check, dry: str | None, seconds: float
) -> dict[str, Any]:
    env = check.env_info
    modules = env.get("modules", {})
    versions = dict(env.get("versions", {}))
    for module, key in (
        ("onnxruntime", "onnxruntime"),
        ("tensorrt", "tensorrt"),
        ("tensorrt_rtx", "tensorrt_rtx"),
        ("nvdiffrast", "nvdiffrast"),
        ("polygraphy", "polygraphy"),
    ):
        versions[key] = modules.get(module, {}).get("version")
    return {
        "schema": report.SCHEMA,
        "generator": "benchmarks/gpu/check.py",
        "command": command_line(args.argv),
        "date": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1),
        "budget_s": args.budget,
        "dry_run": dry is not None,
        "dry_run_reason": dry,
        "machine": env.get("env", {}),
        "gpu": env.get("gpu", {"available": False, "why": "the environment probe failed"}),
        "versions": versions,
        "onnxruntime_providers": modules.get("onnxruntime", {}).get("providers", []),
        "toolchain": env.get("toolchain", {}),
        "timing": {
            "warmup": args.warmup,
            "iters": args.iters,
            "seconds_per_measurement": args.measure_seconds,
            "percentiles": "numpy linear interpolation over the timed iterations",
        },
        "parts": [check.records[p.name] for p in plan.PARTS],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="report folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (default: a new temporary folder, removed after)",
    )
    parser.add_argument("--wheels", type=Path, default=None, help="folder of wheels to install")
    parser.add_argument("--dry-run", action="store_true", help="probe and plan only")
    parser.add_argument(
        "--parts",
        default=",".join(plan.NAMES[2:]),
        help=f"comma-separated subset of: {', '.join(plan.NAMES[2:])}",
    )
    parser.add_argument(
        "--budget", type=float, default=plan.TOTAL_BUDGET_S, help="global deadline in seconds"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, default=100, help="most timed calls per measurement")
    parser.add_argument(
        "--measure-seconds",
        type=float,
        default=3.0,
        help="time one measurement may take (iterations are cut to fit)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also replace the gpu-check block of this markdown file",
    )
    parser.add_argument(
        "--fetch-wheels",
        type=Path,
        default=None,
        metavar="DIR",
        help="only fetch the wheels into DIR (needs the package index)",
    )
    parser.add_argument(
        "--python-version",
        default=f"{sys.version_info[0]}.{sys.version_info[1]}",
        help="with --fetch-wheels: the GPU machine's Python (e.g. 3.12)",
    )
    parser.add_argument(
        "--packages",
        default=",".join(wheels.PACKAGES),
        help=f"with --fetch-wheels: some of {', '.join(wheels.PACKAGES)}",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in plan.NAMES[2:]]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; expected {', '.join(plan.NAMES[2:])}")
    if args.budget < 30:
        parser.error(f"--budget must be at least 30 seconds, got {args.budget:g}")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels must be a folder of .whl files, got {args.wheels}")
    if args.docs is not None and not args.docs.is_file():
        parser.error(f"--docs must be an existing markdown file, got {args.docs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels is not None:
        packages = [p.strip() for p in args.packages.split(",") if p.strip()]
        try:
            return wheels.fetch(args.fetch_wheels, packages, args.python_version)
        except ValueError as exc:
            print(f"--packages: {exc}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        document = run_check(args, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="avatarq-gpu-check-") as tmp:
            document = run_check(args, Path(tmp))
    (args.out / "gpu_check.json").write_text(report.dumps(document))
    (args.out / "gpu_check.md").write_text(report.section_markdown(document))
    if args.docs is not None:
        args.docs.write_text(report.replace_block(args.docs.read_text(), document))
    bad = [p["name"] for p in document["parts"] if p["status"] in ("failed", "timed_out")]
    print(
        f"wrote {args.out / 'gpu_check.json'} and gpu_check.md; "
        f"{'problems in: ' + ', '.join(bad) if bad else 'no part failed'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
