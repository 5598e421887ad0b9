"""The wheels of the GPU check: fetched beforehand where the package index is reachable,
installed offline on the GPU machine into a private folder (``pip install --target``), so
the machine's own environment is never changed.

Sizes of the pinned versions (Linux x86-64, CPython 3.12), as downloaded:

| package (what it provides) | files | size |
|---|---|---|
| nvdiffrast: diffrp-nvdiffrast 0.3.3.1 (sources; the CUDA plugin is compiled on first use) | 1 | 0.14 MiB |
| polygraphy 0.53.6 | 1 | 0.46 MiB |
| onnxruntime-gpu 1.31.1 (CUDA 13, cuDNN 9) | 1 | 243.7 MiB |
| tensorrt-rtx 1.7.1.116 (CUDA 13): metapackages, bindings, libraries | 4 | 92.0 MiB |

nvdiffrast and polygraphy fit any 64 MiB transfer; onnxruntime-gpu and TensorRT-RTX do
not, so on such a machine they must already be installed or fetched into a folder there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
TRANSFER_LIMIT_MIB = 64


@dataclass(frozen=True)
class Requirement:
    """One distribution to fetch: ``wheel`` (a binary for the target platform from the
    index) or ``build`` (a pure-Python metapackage published as an sdist only, built into
    a wheel here so the GPU machine needs no build step)."""

    name: str
    version: str
    how: str = "wheel"


PACKAGES: dict[str, tuple[Requirement, ...]] = {
    "nvdiffrast": (Requirement("diffrp-nvdiffrast", "0.3.3.1"),),
    "polygraphy": (Requirement("polygraphy", "0.53.6"),),
    "onnxruntime-gpu": (Requirement("onnxruntime-gpu", "1.31.1"),),
    "tensorrt-rtx": (
        Requirement("tensorrt-rtx", "1.7.1.116", "build"),
        Requirement("tensorrt-rtx-cu13", "1.7.1.116", "build"),
        Requirement("tensorrt-rtx-cu13-bindings", "1.7.1.116"),
        Requirement("tensorrt-rtx-cu13-libs", "1.7.1.116"),
    ),
}
"""Package groups by the name users pass to ``--packages``."""

PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def fetch_commands(
    dest: Path, packages: list[str], python_version: str, python: str = sys.executable
) -> list[list[str]]:
    """The pip commands that fetch ``packages`` (names of `PACKAGES`) into ``dest`` for
    CPython ``python_version`` ("3.12") on Linux x86-64, one command per distribution so
    one failure costs only that distribution."""
    unknown = [p for p in packages if p not in PACKAGES]
    if unknown:
        raise ValueError(
            f"unknown package(s) {', '.join(unknown)}; expected some of {', '.join(PACKAGES)}"
        )
    commands = []
    for group in packages:
        for req in PACKAGES[group]:
            pin = f"{req.name}=={req.version}"
            if req.how == "build":
                commands.append(
                    [python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), pin]
                )
                continue
            platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
            commands.append(
                [
                    python,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--python-version",
                    python_version,
                    "--implementation",
                    "cp",
                    *platform,
                    "-d",
                    str(dest),
                    pin,
                ]
            )
    return commands


def fetch(dest: Path, packages: list[str], python_version: str, say=print) -> int:
    """Run `fetch_commands`; print what was fetched with sizes. Returns 0 when all worked."""
    dest.mkdir(parents=True, exist_ok=True)
    failed = 0
    for command in fetch_commands(dest, packages, python_version):
        say("$ python " + " ".join(command[1:]))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            failed += 1
            lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
            say(f"  failed: {(lines or result.stderr.splitlines() or ['no output'])[-1]}")
    total = 0
    for wheel in sorted(dest.glob("*.whl")):
        total += wheel.stat().st_size
        say(f"  {wheel.name}  {wheel.stat().st_size / MIB:.2f} MiB")
    fits = "fits" if total <= TRANSFER_LIMIT_MIB * MIB else "does not fit"
    say(f"{total / MIB:.1f} MiB in {dest} ({fits} a {TRANSFER_LIMIT_MIB} MiB transfer)")
    return 1 if failed else 0


def distribution(wheel: Path) -> str:
    """The normalized distribution name of a wheel file."""
    from packaging.utils import parse_wheel_filename

    return str(parse_wheel_filename(wheel.name)[0])


def compatible(wheel: Path) -> bool:
    """Whether this interpreter and platform can install ``wheel``."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    tags = parse_wheel_filename(wheel.name)[3]
    supported = set(sys_tags())
    return any(tag in supported for tag in tags)


def plan_install(wheels: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """(wheels to install, skipped wheels with why) from the folder ``wheels``.

    Skipped: other files (an sdist), wheels for another Python or platform, and every
    version of a distribution that appears more than once (pip cannot install two; the
    folder must keep one).
    """
    files = sorted(wheels.glob("*.whl"))
    skipped: list[dict[str, Any]] = [
        {"file": f.name, "reason": "not a wheel (an sdist would need a build: use --fetch-wheels)"}
        for f in sorted(wheels.iterdir())
        if f.is_file() and f.suffix != ".whl"
    ]
    usable = []
    for wheel in files:
        try:
            ok = compatible(wheel)
        except Exception as exc:  # an odd file name: report it, install the rest
            skipped.append({"file": wheel.name, "reason": f"not a wheel file name ({exc})"})
            continue
        if ok:
            usable.append(wheel)
        else:
            skipped.append({"file": wheel.name, "reason": "built for another Python or platform"})
    by_name: dict[str, list[Path]] = {}
    for wheel in usable:
        by_name.setdefault(distribution(wheel), []).append(wheel)
    install = []
    for name, group in sorted(by_name.items()):
        if len(group) > 1:
            files_text = ", ".join(w.name for w in group)
            for wheel in group:
                skipped.append(
                    {
                        "file": wheel.name,
                        "reason": f"{len(group)} versions of {name} ({files_text})",
                    }
                )
        else:
            install.append(group[0])
    return install, skipped


def install(
    wheels: Path, site: Path, timeout: float, dry_run: bool = False, python: str = sys.executable
) -> dict[str, Any]:
    """Install the wheels of ``wheels`` offline into ``site`` (one pip call per wheel,
    ``--no-index --find-links WHEELS --no-deps --target SITE``); the check then puts
    ``site`` first on PYTHONPATH, so onnxruntime-gpu shadows a CPU onnxruntime.

    Returns a part record: status ok/failed/skipped, reason, and per wheel its size and
    outcome.
    """
    if not wheels.is_dir():
        return {"status": "failed", "reason": f"--wheels {wheels} is not a folder"}
    todo, skipped = plan_install(wheels)
    size = sum(w.stat().st_size for w in todo) / MIB
    listed = [{"file": w.name, "mib": round(w.stat().st_size / MIB, 2)} for w in todo]
    results = {"folder": str(wheels), "site": str(site), "mib": round(size, 2)}
    results.update(wheels=listed, not_installed=skipped)
    record: dict[str, Any] = {"results": results}
    if not todo:
        return {**record, "status": "skipped", "reason": f"no installable wheel in {wheels}"}
    if dry_run:
        names = ", ".join(w.name for w in todo)
        return {
            **record,
            "status": "skipped",
            "reason": f"dry run: would install {len(todo)} wheels ({size:.1f} MiB): {names}",
        }
    site.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    failures = []
    for entry, wheel in zip(listed, todo, strict=True):
        left = deadline - time.monotonic()
        if left <= 1:
            entry["installed"] = False
            entry["error"] = "install budget spent"
            failures.append(wheel.name)
            continue
        command = [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
            str(site),
            str(wheel),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=left)
            ok, error = result.returncode == 0, _last_error(result.stderr)
        except subprocess.TimeoutExpired:
            ok, error = False, f"pip ran past {left:.0f} s"
        entry["installed"] = ok
        if not ok:
            entry["error"] = error
            failures.append(wheel.name)
    record["seconds"] = round(time.monotonic() - deadline + timeout, 1)
    if failures:
        return {**record, "status": "failed", "reason": f"could not install {', '.join(failures)}"}
    return {**record, "status": "ok", "reason": ""}


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return ((errors or lines or ["no output"])[-1])[:300]
