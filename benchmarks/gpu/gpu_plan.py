"""The parts of the GPU check, their budgets, and what each needs to run.

A part runs when everything it needs is here; otherwise it is skipped and the record says
which needs are missing and why, so a dry run on a CPU tells what a GPU machine must have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOTAL_BUDGET_S = 470.0
"""Default global deadline: the whole check ends inside 8 minutes."""
RESERVE_S = 8.0
"""Kept back from the deadline for writing the report."""
MIN_PART_S = 12.0
"""A part is not started with less time than this left."""


@dataclass(frozen=True)
class PartSpec:
    """One part of the check.

    Attributes:
        name: the name in ``--parts``, the JSON and the markdown.
        title: what it does, in a few words.
        budget_s: the most seconds it may take (it is killed then, keeping what it wrote).
        kind: "wheels" and "pytest" run in check.py; "worker" in gpu_worker.py's process.
        needs: prerequisites, checked in this order (see `missing`).
    """

    name: str
    title: str
    budget_s: float
    kind: str
    needs: tuple[str, ...] = ()


PARTS: tuple[PartSpec, ...] = (
    PartSpec("wheels", "install the given wheels offline into a private folder", 90, "wheels"),
    PartSpec("environment", "GPU, driver, versions, nvdiffrast toolchain", 60, "worker"),
    PartSpec(
        "torch-decode",
        "torch decode latency: FP32/FP16, eager/CUDA graph, runner",
        90,
        "worker",
        ("cuda",),
    ),
    PartSpec(
        "nvdiffrast-build",
        "nvdiffrast CUDA plugin JIT build and a first raster",
        150,
        "worker",
        ("cuda", "nvdiffrast", "toolchain"),
    ),
    PartSpec(
        "nvdiffrast-render",
        "render latency at 2048x1334, batch 1 and 8",
        45,
        "worker",
        ("cuda", "nvdiffrast-plugin"),
    ),
    PartSpec("pytest-gpu", "every GPU-marked test (pytest -m gpu)", 150, "pytest", ("cuda",)),
    PartSpec(
        "bundles",
        "FP32 and INT8 bundles of the full-size decoder (CPU)",
        100,
        "worker",
        ("cuda", "bundle-user"),
    ),
    PartSpec(
        "ort-cuda",
        "ONNX Runtime CUDA provider on the FP32 and INT8 bundles",
        90,
        "worker",
        ("cuda", "ort-cuda", "bundles"),
    ),
    PartSpec(
        "tensorrt",
        "TensorRT engines of both bundles: build, run, CUDA graph",
        150,
        "worker",
        ("cuda", "tensorrt", "bundles"),
    ),
    PartSpec(
        "tensorrt-rtx",
        "TensorRT-RTX engines of both bundles: build, run",
        100,
        "worker",
        ("cuda", "tensorrt_rtx", "rtx-gpu", "bundles"),
    ),
)
NAMES = tuple(p.name for p in PARTS)
BUNDLE_USERS = ("ort-cuda", "tensorrt", "tensorrt-rtx")


def _module_problem(env: dict[str, Any], module: str, install: str) -> str | None:
    info = env.get("modules", {}).get(module, {})
    if not info.get("installed"):
        return f"{module} is not installed ({install})"
    if not info.get("importable"):
        return f"{module} is installed but does not import ({info.get('error')})"
    return None


def missing(
    need: str, env: dict[str, Any], done: dict[str, dict[str, Any]], selected: tuple[str, ...]
) -> str | None:
    """Why ``need`` is not met here (None when it is).

    Args:
        env: the environment part's results (gpu, modules, toolchain).
        done: records of the parts run so far, by name.
        selected: the parts this run was asked for.
    """
    gpu = env.get("gpu", {})
    if need == "cuda":
        return None if gpu.get("available") else f"no CUDA: {gpu.get('why', 'unknown')}"
    if need == "nvdiffrast":
        return _module_problem(env, "nvdiffrast", "diffrp-nvdiffrast; pass --wheels")
    if need == "toolchain":
        gaps = env.get("toolchain", {}).get("missing", ["the toolchain was not probed"])
        return f"the JIT build lacks {', '.join(gaps)}" if gaps else None
    if need == "tensorrt":
        return _module_problem(env, "tensorrt", "full TensorRT comes from NVIDIA's own index")
    if need == "tensorrt_rtx":
        return _module_problem(env, "tensorrt_rtx", "tensorrt-rtx; pass --wheels")
    if need == "rtx-gpu":  # only known with a GPU; "cuda" covers the case without one
        rtx = gpu.get("tensorrt_rtx", {"runs": not gpu.get("available")})
        return None if rtx.get("runs") else rtx.get("reason", "unknown")
    if need == "ort-cuda":
        info = env.get("modules", {}).get("onnxruntime", {})
        providers = info.get("providers", [])
        if "CUDAExecutionProvider" in providers:
            return None
        return (
            f"onnxruntime {info.get('version')} has no CUDA provider (providers: "
            f"{', '.join(providers) or 'none'}); install onnxruntime-gpu (pass --wheels)"
        )
    if need in ("nvdiffrast-plugin", "bundles"):
        part = {"nvdiffrast-plugin": "nvdiffrast-build", "bundles": "bundles"}[need]
        record = done.get(part)
        if record is None:
            return f"part {part} did not run"
        if record["status"] != "ok":
            return f"part {part} {record['status']}"
        return None
    if need == "bundle-user":
        reasons = []
        for name in BUNDLE_USERS:
            spec = next(p for p in PARTS if p.name == name)
            if name not in selected:
                reasons.append(f"{name} not selected")
                continue
            gaps = [
                m for n in spec.needs if n != "bundles" and (m := missing(n, env, done, selected))
            ]
            if not gaps:
                return None
            reasons.append(f"{name}: {gaps[0]}")
        return "no part that uses the bundles can run here (" + "; ".join(reasons) + ")"
    raise ValueError(f"unknown prerequisite {need!r}")


def skip_reason(
    spec: PartSpec,
    env: dict[str, Any],
    done: dict[str, dict[str, Any]],
    selected: tuple[str, ...],
    dry_run: str | None,
) -> str | None:
    """Why ``spec`` does not run here, or None. A dry run skips every part after the
    environment and names, besides, every prerequisite that would be missing."""
    if spec.name not in selected:
        return "not selected (--parts)"
    gaps = []
    for need in spec.needs:
        if dry_run and need in ("cuda", "bundle-user", "nvdiffrast-plugin", "bundles"):
            continue  # the dry run's reason says whether CUDA is here; the rest are parts
        reason = missing(need, env, done, selected)
        if reason:
            gaps.append(reason)
            if not dry_run:
                break
    if dry_run:
        return f"dry run ({dry_run})" + (f"; would also need: {'; '.join(gaps)}" if gaps else "")
    return gaps[0] if gaps else None


def dry_run_reason(requested: bool, env: dict[str, Any]) -> str | None:
    """Why this run is a dry run: asked for, or no CUDA here (None: a real run)."""
    if requested:
        return "--dry-run"
    gpu = env.get("gpu", {})
    if not gpu.get("available"):
        return f"no CUDA here: {gpu.get('why', 'unknown')}"
    return None
