"""The one place ONNX Runtime sessions are made (export validation, engines, peers, bench).

onnxruntime is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avatarq.errors import AvatarqError


def session_options(threads: int = 0, profile_prefix: str | None = None, spin_wait: bool = False):
    """ORT SessionOptions: all graph optimizations, ``threads`` intra-op threads (0: ORT's
    default), sequential execution, warnings silenced; profiling when a prefix is given.

    ``spin_wait=False`` stops idle intra-op threads from spinning between operators. Spinning
    saves a little latency on a dedicated CPU but is ruinous on a shared one: measured on a
    loaded 2-vCPU machine, the full-size DAM decoder took 184 ms with spinning, 86 ms without.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def providers_for(device: str) -> list[str]:
    """ORT providers for ``cpu`` or ``cuda`` (CUDA first, CPU as fallback for CPU-only ops)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise AvatarqError(
            "device cuda needs onnxruntime-gpu (this onnxruntime has only "
            f"{', '.join(ort.get_available_providers())}); use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this onnxruntime has the CUDA provider, else ``cpu``."""
    if device != "auto":
        return device
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def make_session(
    model: str | Path | bytes,
    device: str = "cpu",
    threads: int = 0,
    options: Any = None,
    spin_wait: bool = False,
):
    """An InferenceSession; a graph ORT cannot load is an AvatarqError with ORT's first line."""
    import onnxruntime as ort

    options = options if options is not None else session_options(threads, spin_wait=spin_wait)
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers_for(device))
    except AvatarqError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        label = "the graph" if isinstance(model, bytes) else str(model)
        raise AvatarqError(f"ONNX Runtime cannot load {label}: {first}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # ORT logs why the provider did not load and silently runs on the CPU instead.
        raise AvatarqError(
            f"ONNX Runtime {ort.__version__} could not load its CUDA provider (the CUDA and "
            "cuDNN libraries it was built for are missing; its log above names them); "
            "use --device cpu"
        )
    return session
