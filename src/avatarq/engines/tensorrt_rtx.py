"""NVIDIA TensorRT for RTX (Python module ``tensorrt_rtx``, ``pip install tensorrt-rtx``).

Builds ahead of time on any machine, GPU or not; the engine is portable to the compute
capabilities it targets (default: Ampere and later, i.e. 8.0, 8.6, 8.9, 12.x; Turing 7.5
only when asked for) and its kernels are JIT-compiled on the GPU at load, cached in a
runtime cache beside the engine. Hopper (9.0) and other data-center-only architectures are
not supported by TensorRT-RTX: use the ``tensorrt`` backend there. Timing caches are no-ops
in TensorRT-RTX, so none is kept.
"""

from __future__ import annotations

from typing import Any

from avatarq.engines.tensorrt_common import TensorRTBuilderBase, TensorRTRunnerBase, sm
from avatarq.errors import AvatarqError

BACKEND = "tensorrt-rtx"
DISPLAY = "TensorRT-RTX"
DEFAULT_TARGET = "ampere+"
# What an engine built without explicit compute capabilities runs on.
DEFAULT_CAPABILITIES = ("sm80", "sm86", "sm89")
SUPPORTED = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


def runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether an engine built for ``target`` ("ampere+" or "sm86+sm89") runs on a GPU."""
    here = sm(capability)
    if target == DEFAULT_TARGET:
        return here in DEFAULT_CAPABILITIES or capability[0] >= 12
    return here in target.split("+")


class TensorRTRTXBuilder(TensorRTBuilderBase):
    backend = BACKEND
    module_name = "tensorrt_rtx"
    display = DISPLAY
    uses_timing_cache = False

    def target(self) -> str:
        caps = self.options.compute_capabilities
        return "+".join(caps) if caps else DEFAULT_TARGET

    def _configure_target(self, trt, config) -> None:
        caps = self.options.compute_capabilities
        if not caps:
            return
        members = trt.ComputeCapability.__members__
        unknown = [c for c in caps if c.upper() not in members]
        if unknown:
            known = ", ".join(m.lower() for m in members if m.startswith("SM"))
            raise AvatarqError(
                f"{DISPLAY} {trt.__version__} cannot target {', '.join(unknown)}; it knows {known}"
            )
        config.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            if not config.set_compute_capability(members[cap.upper()], i):
                raise AvatarqError(f"{DISPLAY} refused compute capability {cap}")


class TensorRTRTXRunner(TensorRTRunnerBase):
    backend = BACKEND
    module_name = "tensorrt_rtx"
    display = DISPLAY

    def check_target(self, capability: tuple[int, int], device_name: str) -> None:
        if runs_on(self.record.target, capability):
            return
        if sm(capability) not in SUPPORTED and capability[0] < 12:
            raise AvatarqError(
                f"{DISPLAY} does not run on this GPU ({device_name}, {sm(capability)}); it "
                f"supports {', '.join(SUPPORTED)}. Use --backend tensorrt on this GPU"
            )
        raise AvatarqError(
            f"this {DISPLAY} engine was built for {self.record.target}; this GPU "
            f"({device_name}) is {sm(capability)}. Rebuild with --compute-capability "
            f"{sm(capability)}"
        )

    @property
    def runtime_cache_path(self):
        return self.engine_path.with_name(self.engine_path.name + ".runtime-cache")

    def _create_context(self, trt, engine) -> Any:
        # The runtime cache keeps JIT-compiled kernels between runs; the built-in CUDA graph
        # strategy replaces the generic capture of the base class.
        self._runtime_config = engine.create_runtime_config()
        self._runtime_cache = self._runtime_config.create_runtime_cache()
        if self.runtime_cache_path.is_file():
            self._runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
        self._runtime_config.set_runtime_cache(self._runtime_cache)
        if self.cuda_graph:
            self._runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return engine.create_execution_context(self._runtime_config)

    def _execute(self, batch: int) -> None:
        self._enqueue()

    def _deactivate(self) -> None:
        cache = getattr(self, "_runtime_cache", None)
        try:
            if cache is not None:
                from avatarq.core.files import atomic_write_bytes

                atomic_write_bytes(self.runtime_cache_path, bytes(cache.serialize()))
        except OSError:
            pass  # a read-only bundle just recompiles next time
        finally:
            self._runtime_cache = self._runtime_config = None
            super()._deactivate()
