"""Embed an avatarq bundle in an application's frame loop.

Each tick decodes one frame (texture + mesh) from the current expression code; a real
application would take the code from its encoder or network and hand the outputs to its
renderer. Run it on any bundle:

    python examples/embed_frame_loop.py dam.avq --frames 120
    python examples/embed_frame_loop.py dam.avq --backend tensorrt-rtx
"""

from __future__ import annotations

import argparse

import numpy as np

from avatarq.errors import AvatarqError
from avatarq.runtime import AvatarRuntime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle directory written by `avatarq export`")
    parser.add_argument("--frames", type=int, default=60, help="frames to decode")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime, onnx, tensorrt, ...")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    with AvatarRuntime.open(args.bundle, backend=args.backend, threads=2) as avatar:
        z = rng.standard_normal((1, avatar.z_dim)).astype(np.float32)
        view = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
        for _ in range(args.frames):
            # A slowly drifting expression: what a live encoder would send each frame.
            z = (0.95 * z + 0.3 * rng.standard_normal(z.shape)).astype(np.float32)
            texture, vertices = avatar.decode(z, view, copy=False)
            # ... upload texture [1, 3, T, T] and vertices [1, V, 3] to the renderer here ...
        stats = avatar.latency()
        print(
            f"decoded {args.frames} frames with {avatar.backend}: texture "
            f"{list(texture.shape)}, vertices {list(vertices.shape)}, "
            f"p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except AvatarqError as exc:
        raise SystemExit(f"error: {exc}") from None
