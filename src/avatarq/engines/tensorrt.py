"""Full NVIDIA TensorRT (10.x / 11.x, Python module ``tensorrt``).

Engines are specific to the GPU architecture and TensorRT version they are built with, so
the builder needs the target GPU and records it as ``sm<major><minor>``; the runner refuses
an engine built for another GPU or TensorRT version. All logic is shared with TensorRT-RTX
in `avatarq.engines.tensorrt_common`. Full TensorRT cannot be installed from PyPI on
machines that cannot reach NVIDIA's package index; this code then is untested there.
"""

from __future__ import annotations

from avatarq.engines.tensorrt_common import (
    TensorRTBuilderBase,
    TensorRTRunnerBase,
    device_capability,
    sm,
)
from avatarq.errors import AvatarqError

BACKEND = "tensorrt"
DISPLAY = "TensorRT"


class TensorRTBuilder(TensorRTBuilderBase):
    backend = BACKEND
    module_name = "tensorrt"
    display = DISPLAY

    def target(self) -> str:
        capability = device_capability()
        if capability is None:
            raise AvatarqError(
                "TensorRT builds engines for the GPU it runs on, and torch sees no CUDA device "
                "here; build on the target machine, or use --backend tensorrt-rtx (builds on a CPU)"
            )
        return sm(capability)


class TensorRTRunner(TensorRTRunnerBase):
    backend = BACKEND
    module_name = "tensorrt"
    display = DISPLAY

    def check_target(self, capability: tuple[int, int], device_name: str) -> None:
        if self.record.target != sm(capability):
            raise AvatarqError(
                f"this TensorRT engine was built for {self.record.target}; this GPU "
                f"({device_name}) is {sm(capability)}. Rebuild it here: avatarq build "
                f"BUNDLE --backend tensorrt"
            )
