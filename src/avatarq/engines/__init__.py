"""avatarq.engines: builders and runners behind one interface (see docs/engines.md).

    from avatarq.engines import build_engine, open_runner
    build_engine("dam.avq", "tensorrt-rtx")
    with open_runner("dam.avq", "onnxruntime") as runner:
        texture, vertices = runner.decode(z, view)

Importing this package imports neither TensorRT nor ONNX Runtime; backends load on use.
"""

from avatarq.engines.base import Builder, BuildOptions, BuildResult, Runner, RunOptions
from avatarq.engines.registry import (
    AUTO_ORDER,
    BACKENDS,
    Backend,
    available_backends,
    build_engine,
    describe_backends,
    get_backend,
    open_runner,
    register_backend,
    resolve_backend,
)

__all__ = [
    "AUTO_ORDER",
    "resolve_backend",
    "BACKENDS",
    "Backend",
    "BuildOptions",
    "BuildResult",
    "Builder",
    "RunOptions",
    "Runner",
    "available_backends",
    "build_engine",
    "describe_backends",
    "get_backend",
    "open_runner",
    "register_backend",
]
