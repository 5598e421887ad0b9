"""One part of the GPU check, run in its own process by check.py:

    python benchmarks/gpu/gpu_worker.py PART --work DIR --result FILE --seconds S

A process per part keeps a crash, a hang (killed at its budget) or a CUDA error in one
part from taking the others down, and lets the wheels installed by the check shadow the
machine's packages. The result file is rewritten after every measurement, so a part that
is killed still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_report import dumps  # noqa: E402

BATCHES = (1, 8)


class Context:
    """What a part gets: its folders, its clock, the timing settings, and a result record
    written to disk whenever it changes."""

    def __init__(self, work: Path, result: Path, device: str, timing: Any, deadline: Any) -> None:
        self.work = work
        self.device = device
        self.result_path = result
        self.timing = timing
        self.deadline = deadline
        self.record: dict[str, Any] = {"status": "running", "reason": "", "results": {}}
        self.started = time.monotonic()

    @property
    def results(self) -> dict[str, Any]:
        return self.record["results"]

    def save(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.started, 2)
        tmp = self.result_path.with_name(self.result_path.name + ".partial")
        tmp.write_text(dumps(self.record))
        tmp.replace(self.result_path)

    def emit(self, row: dict[str, Any]) -> None:
        """Keep one table row and save at once (a killed part keeps it)."""
        self.results.setdefault("rows", []).append(row)
        self.save()

    def finish(self, status: str, reason: str = "") -> None:
        self.record["status"] = status
        self.record["reason"] = reason
        self.save()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list[str], timeout: float = 20.0) -> str | None:
    """The output of a command, or None when it is missing or fails."""
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py, where installed

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        return out.splitlines()[0].strip() if out else None


def _module(name: str, dist: str | None = None) -> dict[str, Any]:
    """Whether a module can be imported here, its version and where it lives."""
    if importlib.util.find_spec(name) is None:
        return {"installed": False}
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # installed but broken (a missing CUDA library, say)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return {"installed": True, "importable": False, "error": first}
    version = getattr(module, "__version__", None) or (_version(dist) if dist else None)
    return {
        "installed": True,
        "importable": True,
        "version": version,
        "path": str(Path(module.__file__).parent) if getattr(module, "__file__", None) else None,
    }


def toolchain() -> dict[str, Any]:
    """What nvdiffrast's JIT build needs: torch's CUDA_HOME with nvcc and the CUDA headers,
    ninja and a C++ compiler; ``missing`` names what is not there."""
    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME  # None in a CPU-only torch build
    nvcc = str(Path(cuda_home) / "bin" / "nvcc") if cuda_home else shutil.which("nvcc")
    nvcc_version = _run([nvcc, "--version"]) if nvcc else None
    headers = bool(cuda_home) and (Path(cuda_home) / "include" / "cuda_runtime.h").is_file()
    ninja = shutil.which("ninja")
    compilers = (os.environ.get("CXX"), "c++", "g++", "clang++")
    cxx = next((c for c in compilers if c and shutil.which(c)), None)
    info = {
        "cuda_home": cuda_home,
        "cuda_headers": headers,
        "nvcc": nvcc if nvcc_version else None,
        "nvcc_version": nvcc_version.splitlines()[-1] if nvcc_version else None,
        "ninja": ninja,
        "ninja_version": _run([ninja, "--version"]) if ninja else None,
        "cxx": shutil.which(cxx) if cxx else None,
        "cxx_version": (_run([cxx, "--version"]) or "").splitlines()[0] if cxx else None,
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
    }
    missing = []
    if not info["nvcc"]:
        missing.append("nvcc (no CUDA toolkit found: set CUDA_HOME, or put nvcc on PATH)")
    elif torch.version.cuda is not None and not headers:
        missing.append(
            f"the CUDA headers ({cuda_home}/include/cuda_runtime.h; set CUDA_HOME to the "
            "CUDA toolkit folder)"
        )
    if not info["ninja_version"]:
        missing.append("ninja (pip install ninja, or the system package)")
    if not info["cxx"]:
        missing.append("a C++ compiler (c++ or g++)")
    info["missing"] = missing
    return info


def part_environment(ctx: Context) -> None:
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "executable": sys.executable,
    }
    cuda = torch.cuda.is_available()
    gpu: dict[str, Any] = {"available": cuda, "torch_cuda": torch.version.cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        gpu.update(
            name=torch.cuda.get_device_name(0),
            capability=f"{major}.{minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            count=torch.cuda.device_count(),
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
            tensorrt_rtx=rtx_support((major, minor), torch.cuda.get_device_name(0)),
        )
    else:
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
        gpu["why"] = f"torch {torch.__version__} ({build}) sees no CUDA device"
    versions = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnx": _version("onnx"),
        "avatarq": _version("avatarq") or _module("avatarq").get("version"),
    }
    modules = {
        "onnxruntime": _module("onnxruntime"),
        "tensorrt": _module("tensorrt"),
        "tensorrt_rtx": _module("tensorrt_rtx"),
        "nvdiffrast": _module("nvdiffrast", "diffrp-nvdiffrast"),
        "polygraphy": _module("polygraphy"),
    }
    if modules["onnxruntime"].get("importable"):
        import onnxruntime

        modules["onnxruntime"]["providers"] = onnxruntime.get_available_providers()
    ctx.results.update(env=env, gpu=gpu, versions=versions, modules=modules, toolchain=toolchain())
    ctx.finish("ok")


def rtx_support(capability: tuple[int, int], device_name: str) -> dict[str, Any]:
    """Whether TensorRT-RTX runs on this GPU (avatarq's list of its compute capabilities)."""
    from avatarq.engines.tensorrt_common import sm
    from avatarq.engines.tensorrt_rtx import SUPPORTED

    here = sm(capability)
    if here in SUPPORTED or capability[0] >= 12:
        return {"runs": True, "reason": ""}
    family = " (Hopper)" if capability[0] == 9 else ""
    return {
        "runs": False,
        "reason": (
            f"TensorRT-RTX does not run on compute capability {capability[0]}.{capability[1]}"
            f"{family}, this {device_name}: it supports {', '.join(SUPPORTED)}; "
            "the tensorrt backend is the one for this GPU"
        ),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- torch decode


def full_size_checkpoint(work: Path) -> Path:
    """The seeded full-size random-weight checkpoint, saved once under ``work``."""
    from gpu_measure import decoder_model

    from avatarq.models import save_checkpoint

    path = work / "dam_full.pt"
    if not path.is_file():
        save_checkpoint(decoder_model(), path)  # written atomically
    return path


def part_torch_decode(ctx: Context) -> None:
    import torch
    from gpu_measure import FULL_SIZE, decoder_model, runner_rows, torch_decode_rows

    from avatarq.engines.torch_runner import TorchRunner
    from avatarq.models import DeployableDecoder

    torch.backends.cudnn.benchmark = True
    ctx.results["settings"] = {
        "cudnn_benchmark": True,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    device = torch.device(ctx.device)
    say("building the full-size decoder")
    decoder = DeployableDecoder(decoder_model())
    precisions = ("fp32", "fp16")
    torch_decode_rows(decoder, device, BATCHES, precisions, ctx.timing, ctx.deadline, emit=ctx.emit)
    del decoder
    checkpoint = full_size_checkpoint(ctx.work)
    for fp16 in (False, True):
        labels = {"runtime": "torch", "precision": "fp16" if fp16 else "fp32", "mode": "runner"}
        runner = TorchRunner(checkpoint, fp16=fp16, device=ctx.device, max_batch=max(BATCHES))
        with runner:
            runner_rows(
                runner, FULL_SIZE, BATCHES, device, ctx.timing, ctx.deadline, labels, emit=ctx.emit
            )
    ctx.finish("ok")


# --------------------------------------------------------------------------- nvdiffrast


def part_nvdiffrast_build(ctx: Context) -> None:
    import torch

    start = time.monotonic()
    say("importing nvdiffrast.torch and creating a RasterizeCudaContext (JIT build)")
    try:
        import nvdiffrast.torch as dr

        context = dr.RasterizeCudaContext()
        pos = torch.tensor([[[-0.5, -0.5, 0.5, 1.0], [0.5, -0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0]]])
        tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
        rast, _ = dr.rasterize(context, pos.cuda(), tri.cuda(), resolution=[64, 64])
        covered = int((rast[..., 3] > 0).sum())
    except Exception as exc:
        ctx.results["seconds_to_first_raster"] = round(time.monotonic() - start, 1)
        ctx.finish("failed", _build_error(exc))
        return
    ctx.results.update(
        seconds_to_first_raster=round(time.monotonic() - start, 1),
        nvdiffrast=getattr(dr, "__version__", None) or _version("diffrp-nvdiffrast"),
        covered_pixels_of_test_triangle=covered,
        extensions_dir=os.environ.get("TORCH_EXTENSIONS_DIR") or "torch's default (~/.cache)",
    )
    if covered == 0:
        ctx.finish("failed", "the plugin loaded but rasterized nothing for a visible triangle")
        return
    ctx.finish("ok")


def _build_error(exc: BaseException) -> str:
    """The first compiler error line of a failed JIT build, else the exception's first line."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "Error building" not in ln]
    first = errors[0] if errors else (lines[0] if lines else type(exc).__name__)
    return f"{type(exc).__name__}: {first}"[:400]


def part_nvdiffrast_render(ctx: Context) -> None:
    import torch
    from gpu_measure import FULL_SIZE, head_scene, render_rows

    scene = head_scene()
    ctx.results["scene"] = {
        "resolution": list(scene.resolution),
        "vertices": int(scene.vertices.shape[0]),
        "triangles": scene.topology.n_faces,
        "texture": FULL_SIZE.tex_size,
    }
    backend = "nvdiffrast" if ctx.device == "cuda" else "torch"
    device = torch.device(ctx.device)
    size = FULL_SIZE.tex_size
    render_rows(scene, backend, device, BATCHES, size, ctx.timing, ctx.deadline, ctx.emit)
    ctx.finish("ok")


# --------------------------------------------------------------------------- bundles


BUNDLES = {"fp32": "dam_fp32.avq", "int8": "dam_int8.avq"}


def part_bundles(ctx: Context) -> None:
    """FP32 and INT8 bundles of the full-size decoder (CPU work), and ORT CPU references."""
    import numpy as np
    from gpu_measure import FULL_SIZE, decoder_inputs

    from avatarq.calibration import CalibrationConfig
    from avatarq.calibration.pipeline import calibrate
    from avatarq.calibration.samples import samples_from_latents
    from avatarq.core.inputs import DecoderInputs
    from avatarq.core.ort import make_session
    from avatarq.export import ExportOptions, export_bundle
    from avatarq.models import DeployableDecoder, load_checkpoint

    checkpoint = full_size_checkpoint(ctx.work)
    calib = ctx.work / "calib"
    if not (calib / "calib.json").is_file():
        say("max calibration on 16 seeded latents")
        start = time.monotonic()
        z, _ = decoder_inputs(FULL_SIZE, 16, seed=1)
        view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (16, 1))
        samples = samples_from_latents(
            DecoderInputs({"z": z, "view": view}), n_random=16, n_clips=0
        )
        decoder = DeployableDecoder(load_checkpoint(checkpoint))
        config = CalibrationConfig(method="max", sensitivity="none")
        calibrate(decoder, samples, config).save(calib)
        ctx.results["calibration_seconds"] = round(time.monotonic() - start, 1)
    z, view = decoder_inputs(FULL_SIZE, 1)
    for precision, name in BUNDLES.items():
        out = ctx.work / name
        if not (out / "manifest.json").is_file():
            reason = ctx.deadline.spent(20.0)
            if reason:
                ctx.finish("failed", f"{precision} bundle not exported: {reason}")
                return
            say(f"exporting the {precision} bundle")
            options = ExportOptions(
                max_batch=max(BATCHES),
                n_validation=2,
                int8=precision == "int8",
                calib=str(calib) if precision == "int8" else None,
            )
            start = time.monotonic()
            export_bundle(checkpoint, out, options=options)
            ctx.results[f"{precision}_export_seconds"] = round(time.monotonic() - start, 1)
        say(f"ONNX Runtime CPU reference of the {precision} bundle")
        session = make_session(out / "model.onnx", "cpu")
        texture, vertices = session.run(["texture", "vertices"], {"z": z, "view": view})
        np.savez(out.with_suffix(".reference.npz"), z=z, view=view, texture=texture)
        ctx.results[f"{precision}_model_mib"] = round(
            (out / "model.onnx").stat().st_size / 2**20, 1
        )
        ctx.save()
    ctx.finish("ok")


def _bundles(work: Path) -> dict[str, tuple[Path, Any]]:
    import numpy as np

    found = {}
    for precision, name in BUNDLES.items():
        root = work / name
        ref = root.with_suffix(".reference.npz")
        if (root / "manifest.json").is_file() and ref.is_file():
            with np.load(ref) as data:
                found[precision] = (root, data["texture"])
    return found


def each_bundle(ctx: Context, work: Callable[[str, Path, Any], None]) -> None:
    """Call ``work(precision, bundle, reference texture)`` for the FP32 and INT8 bundles;
    an error in one is recorded and the other still runs. Finishes the part."""
    bundles = _bundles(ctx.work)
    if not bundles:
        ctx.finish("failed", f"no bundles with references in {ctx.work}")
        return
    errors = []
    for precision, (root, reference) in bundles.items():
        try:
            work(precision, root, reference)
        except Exception as exc:
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            errors.append(f"{precision}: {type(exc).__name__}: {first}")
            ctx.results.setdefault("errors", []).append(errors[-1])
            ctx.save()
    ctx.finish("failed" if errors else "ok", "; ".join(errors))


# --------------------------------------------------------------------------- ONNX Runtime


def part_ort_cuda(ctx: Context) -> None:
    import onnxruntime as ort
    import torch  # before ORT's CUDA provider loads: torch's CUDA and cuDNN libraries
    from gpu_measure import (
        FULL_SIZE,
        decoder_inputs,
        latency_row,
        measure,
        ort_device_io,
        psnr_db,
        runner_rows,
    )

    from avatarq.engines import RunOptions, open_runner

    if ctx.device == "cuda" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # the provider may still find its libraries itself
            ctx.results["preload_dlls"] = f"failed: {exc}"
    device = torch.device(ctx.device)

    def work(precision: str, root: Path, reference: Any) -> None:
        say(f"ORT {ctx.device} provider, {precision} bundle")
        labels = {
            "runtime": f"onnxruntime {ctx.device}",
            "precision": precision,
            "mode": "model.onnx",
        }
        options = RunOptions(device=ctx.device, max_batch=max(BATCHES))
        # One session per bundle (cuDNN's algorithm search runs once): bound to GPU
        # buffers first, then through avatarq's runner with numpy in and out.
        with open_runner(root, "onnx", options) as runner:
            session = runner.session
            ctx.results["providers"] = session.get_providers()
            for batch in BATCHES:
                reason = ctx.deadline.spent(8.0)
                if reason:
                    ctx.emit({**labels, "io": "device", "batch": batch, "skipped": reason})
                    continue
                z, view = decoder_inputs(FULL_SIZE, batch)
                run = ort_device_io(session, {"z": z, "view": view}, ctx.device)
                samples = measure(run, device, ctx.timing, "wall")
                extra = {}
                if batch == 1:
                    texture = session.run(["texture"], {"z": z, "view": view})[0]
                    extra["psnr_vs_reference_db"] = round(psnr_db(texture, reference), 2)
                row = latency_row(samples, batch, io="device", clock="wall", **labels, **extra)
                ctx.emit(row)
            runner_rows(
                runner,
                FULL_SIZE,
                BATCHES,
                device,
                ctx.timing,
                ctx.deadline,
                labels,
                reference,
                ctx.emit,
            )

    each_bundle(ctx, work)


# --------------------------------------------------------------------------- TensorRT


def part_tensorrt(ctx: Context, backend: str = "tensorrt") -> None:
    import torch
    from gpu_measure import FULL_SIZE, runner_rows

    from avatarq.engines import BuildOptions, RunOptions, build_engine, open_runner
    from avatarq.engines.tensorrt_common import sm

    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability()
    caps = (sm(capability),) if backend == "tensorrt-rtx" else ()
    options = BuildOptions(max_batch=max(BATCHES), compute_capabilities=caps)
    ctx.results["build_options"] = options.to_dict()
    builds = ctx.results.setdefault("builds", [])

    def work(precision: str, root: Path, reference: Any) -> None:
        reason = ctx.deadline.spent(45.0)
        if reason:
            builds.append({"precision": precision, "skipped": f"engine not built: {reason}"})
            return
        say(f"building the {backend} engine of the {precision} bundle")
        start = time.monotonic()
        record = build_engine(root, backend, options)
        builds.append(
            {
                "precision": precision,
                "seconds": round(time.monotonic() - start, 1),
                "mib": round(record.size_bytes / 2**20, 1),
                "target": record.target,
                "library_version": record.library_version,
            }
        )
        ctx.save()
        for graph in (False, True):
            mode = "cuda graph" if graph else "engine"
            labels = {"runtime": backend, "precision": precision, "mode": mode}
            run_options = RunOptions(cuda_graph=graph, max_batch=max(BATCHES))
            with open_runner(root, backend, run_options) as runner:
                runner_rows(
                    runner,
                    FULL_SIZE,
                    BATCHES,
                    device,
                    ctx.timing,
                    ctx.deadline,
                    labels,
                    reference,
                    ctx.emit,
                )

    each_bundle(ctx, work)


def part_tensorrt_rtx(ctx: Context) -> None:
    part_tensorrt(ctx, "tensorrt-rtx")


PARTS: dict[str, Callable[[Context], None]] = {
    "environment": part_environment,
    "torch-decode": part_torch_decode,
    "nvdiffrast-build": part_nvdiffrast_build,
    "nvdiffrast-render": part_nvdiffrast_render,
    "bundles": part_bundles,
    "ort-cuda": part_ort_cuda,
    "tensorrt": part_tensorrt,
    "tensorrt-rtx": part_tensorrt_rtx,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one part of the GPU check.")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="this part's budget")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--measure-seconds", type=float, default=3.0)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: try a part's code on a machine without a GPU (slow at full size; "
        "nvdiffrast-render uses the torch rasterizer, ort-cuda the CPU provider)",
    )
    args = parser.parse_args(argv)
    from gpu_measure import Deadline, Timing

    timing = Timing(args.warmup, args.iters, min(20, args.iters), args.measure_seconds)
    # Leave a few seconds for the last save before the check kills this process.
    ctx = Context(args.work, args.result, args.device, timing, Deadline(args.seconds - 5.0))
    ctx.save()
    try:
        PARTS[args.part](ctx)
    except Exception as exc:
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        ctx.finish("failed", f"{type(exc).__name__}: {first}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
