"""The backends by name, and the two verbs on a bundle: `build_engine` and `open_runner`.

A backend is offered when the Python modules it needs can be found (`available_backends`);
nothing is imported until its builder or runner is loaded, so ``import avatarq.engines``
never imports TensorRT. Adding a backend = one `register_backend` call here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarq.core.progress import Progress
from avatarq.engines.base import Builder, BuildOptions, Runner, RunOptions
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, EngineRecord, open_bundle


@dataclass(frozen=True)
class Backend:
    """A registered backend: where its builder and runner live and what they need.

    Attributes:
        name: the name users type (``--backend``).
        module: the avatarq module defining the classes (imported on use).
        runner: runner class name in ``module`` (it has ``from_bundle(bundle, RunOptions)``).
        builder: builder class name, or None when the backend runs without an engine.
        requires: top-level Python modules that must be importable.
        description: one line for listings.
    """

    name: str
    module: str
    runner: str
    builder: str | None
    requires: tuple[str, ...]
    description: str

    def available(self) -> bool:
        """Whether every required module can be found (nothing is imported)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)

    def _load(self, attr: str) -> Any:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise AvatarqError(
                f"backend {self.name} needs the Python module {', '.join(missing)}, which is "
                f"not installed here; available backends: {', '.join(available_backends())}"
            )
        return getattr(importlib.import_module(self.module), attr)

    def runner_class(self) -> type[Runner]:
        return self._load(self.runner)

    def builder_class(self) -> type[Builder]:
        if self.builder is None:
            raise AvatarqError(
                f"backend {self.name} runs without an engine (nothing to build); "
                f"backends that build: {', '.join(b.name for b in BACKENDS.values() if b.builder)}"
            )
        return self._load(self.builder)


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; an unknown name lists the known ones."""
    if name not in BACKENDS:
        raise AvatarqError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def available_backends() -> list[str]:
    """Names of the backends whose modules are installed here, in registration order."""
    return [name for name, backend in BACKENDS.items() if backend.available()]


def describe_backends() -> list[dict[str, Any]]:
    """One dict per registered backend: name, available, builds_engine, description."""
    return [
        {
            "name": b.name,
            "available": b.available(),
            "builds_engine": b.builder is not None,
            "description": b.description,
        }
        for b in BACKENDS.values()
    ]


_DESCRIPTIONS = {
    "onnxruntime": "ONNX Runtime, CPU (CUDA provider when present); INT8 via the phase rewrite",
    "onnx": "model.onnx as exported, under ONNX Runtime: the reference for Q/DQ graphs",
    "tensorrt": "NVIDIA TensorRT 10/11, strongly typed; builds and runs on the target GPU",
    "tensorrt-rtx": "NVIDIA TensorRT for RTX; builds on a CPU, runs on RTX-class GPUs",
    "torch": "the PyTorch decoder from the checkpoint (FP32/FP16, CPU or CUDA)",
}
_BUILT_IN = (  # name, module under avatarq.engines, runner class, builder class, needs
    ("onnxruntime", "onnxruntime", "OnnxRuntimeRunner", "OnnxRuntimeBuilder", "onnxruntime"),
    ("onnx", "onnxruntime", "OnnxModelRunner", None, "onnxruntime"),
    ("tensorrt", "tensorrt", "TensorRTRunner", "TensorRTBuilder", "tensorrt torch"),
    (
        "tensorrt-rtx",
        "tensorrt_rtx",
        "TensorRTRTXRunner",
        "TensorRTRTXBuilder",
        "tensorrt_rtx torch",
    ),
    ("torch", "torch_runner", "TorchRunner", None, "torch"),
)


def _register_built_in() -> None:
    for name, module, runner, builder, requires in _BUILT_IN:
        register_backend(
            Backend(
                name,
                f"avatarq.engines.{module}",
                runner=runner,
                builder=builder,
                requires=tuple(requires.split()),
                description=_DESCRIPTIONS[name],
            )
        )


_register_built_in()


# --------------------------------------------------------------------------- verbs

# What "auto" prefers, best first: an engine built for this machine, else the exported graph.
AUTO_ORDER = ("tensorrt", "tensorrt-rtx", "onnxruntime", "onnx")


def resolve_backend(bundle: Bundle, name: str) -> str:
    """``name``, or for ``auto`` the first backend of `AUTO_ORDER` that is installed, has an
    engine in ``bundle`` (``onnx`` needs none) and can run it here (``Runner.can_run``:
    for TensorRT, a GPU the engine was built for and the same library version)."""
    if name != "auto":
        get_backend(name)
        return name
    built = {e.backend for e in bundle.manifest.engines}
    for candidate in AUTO_ORDER:
        backend = BACKENDS.get(candidate)
        if backend is None or not backend.available():
            continue
        if backend.builder is not None and candidate not in built:
            continue
        if not backend.runner_class().can_run(bundle):
            continue
        return candidate
    raise AvatarqError(
        f"no backend can run {bundle.root} here; available: {', '.join(available_backends())}"
    )


def build_engine(
    bundle: str | Path | Bundle,
    backend: str,
    options: BuildOptions = BuildOptions(),
    progress: Progress | None = None,
) -> EngineRecord:
    """Build ``backend``'s engine for ``bundle`` and record it in the manifest.

    An earlier engine of the same backend and target is replaced (file and record).

    Returns:
        The new `EngineRecord` (``path`` relative to the bundle).
    """
    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    builder = get_backend(backend).builder_class()(options)
    if options.calibration_latents is not None:  # read and check them before any work
        from avatarq.data.latents import load_inputs

        latents = load_inputs(options.calibration_latents)
        if latents.z_dim != opened.manifest.z_dim:
            raise AvatarqError(
                f"latent sequence {options.calibration_latents} has z of size {latents.z_dim}; "
                f"the bundle's decoder takes {opened.manifest.z_dim}"
            )
    result = builder.build(opened, progress)
    record = result.record
    manifest = opened.manifest
    manifest.engines = [
        e for e in manifest.engines if (e.backend, e.target) != (record.backend, record.target)
    ] + [record]
    opened.save_manifest()
    return record


def open_runner(
    bundle: str | Path | Bundle, backend: str, options: RunOptions = RunOptions()
) -> Runner:
    """A runner of ``backend`` for ``bundle`` (not yet active: use it as a context manager).

    Raises:
        AvatarqError: unknown or unavailable backend; a backend that needs an engine and the
            bundle has none built, or its file is missing or corrupt, or it was built by
            another library version or for another GPU.
    """
    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    return get_backend(backend).runner_class().from_bundle(opened, options)
