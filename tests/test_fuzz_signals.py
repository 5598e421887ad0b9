"""Fuzz: SIGTERM and Ctrl-C (SIGINT) while export, calibrate and synth are working (see
fuzz_oracle). The command runs in a subprocess on a terminal (a pseudo-terminal, so its
progress bar shows what it is doing); the signal is sent once the named phase of work has
started. The process must end by the signal's exit code (143, 130) without a traceback,
and leave the folder as it found it: no output, no staging folder, no temporary file.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avatarq.export.bundle import open_bundle
from fuzz_oracle import COUNTS, assert_untouched, leftovers, snapshot

pytestmark = pytest.mark.slow

#: command, the progress text that says its work (and, for export and synth, its staging
#: folder) has started, and the output it must not leave behind.
CASES = {
    "export": (["export", "--model", "dam.pt", "-o", "b.avq"], "validating", "b.avq"),
    "calibrate": (
        ["calibrate", "--model", "dam.pt", "-o", "cal", "--iters", "100000"],
        "calibrating",
        "cal",
    ),
    "synth": (
        ["synth", "syn", "--texture-size", "64", "--model-texture-size", "16", "--z-dim", "4"],
        "training",
        "syn",
    ),
}
SIGNALS = {"SIGTERM": (signal.SIGTERM, 143), "SIGINT": (signal.SIGINT, 130)}
TIMEOUT_S = 240


def run_until(argv: list[str], cwd: Path, phase: str, signum: int) -> tuple[int, str, bool]:
    """Run ``avatarq ARGV`` on a pseudo-terminal, send ``signum`` once ``phase`` shows in its
    progress; returns (exit code, everything it printed, whether a staging folder or
    temporary file existed when the signal was sent)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from avatarq.cli import main; main()", *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen, staged, sent = b"", False, False
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.01)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the process closed the terminal
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                seen += chunk
            if not sent and phase.encode() in seen:
                staged = bool(leftovers(cwd))
                proc.send_signal(signum)
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert sent, f"never saw {phase!r}: {seen.decode(errors='replace')[-500:]}"
    return code, seen.decode(errors="replace"), staged


#: (command, signal) pairs run; Ctrl-C takes the same path as SIGTERM, export covers it.
RUNS = [(command, "SIGTERM") for command in CASES] + [("export", "SIGINT")]


@pytest.fixture(scope="module")
def signalled(fuzz_bundle, tmp_path_factory) -> dict:
    """Every run of RUNS, started together (they spend most of their time importing):
    {(command, signal): (folder, its snapshot before, exit code, output, staged)}."""
    from concurrent.futures import ThreadPoolExecutor

    folders = {}
    for command, signame in RUNS:
        folder = tmp_path_factory.mktemp(f"{command}-{signame}")
        shutil.copy(fuzz_bundle[0], folder / "dam.pt")
        (folder / "notes.txt").write_text("mine\n")
        folders[command, signame] = (folder, snapshot(folder))

    def run(key):
        command, signame = key
        argv, phase, _ = CASES[command]
        COUNTS["signal"] += 1
        return run_until(argv, folders[key][0], phase, SIGNALS[signame][0])

    with ThreadPoolExecutor(len(RUNS)) as pool:
        results = dict(zip(RUNS, pool.map(run, RUNS), strict=True))
    return {key: (*folders[key], *results[key]) for key in RUNS}


@pytest.mark.parametrize("command, signame", RUNS)
def test_a_signal_during_work_leaves_nothing_behind(command, signame, signalled):
    folder, before, code, printed, staged = signalled[command, signame]
    assert "Traceback" not in printed, printed[-2000:]
    output = CASES[command][2]
    if command == "export" and (folder / output).exists():
        # The progress bar shows a phase up to a refresh (0.1 s) late, so on a tiny decoder
        # the signal may land after the bundle's atomic commit: the bundle must then be whole.
        assert code in (0, SIGNALS[signame][1]), printed[-2000:]
        open_bundle(folder / output)
        assert_untouched(before, folder, new_allowed=lambda rel: rel.split("/")[0] == output)
        return
    assert code == SIGNALS[signame][1], printed[-2000:]
    assert not (folder / output).exists()
    assert_untouched(before, folder)
    if command in ("export", "synth"):
        assert staged, "the signal was sent before the staging folder existed"
