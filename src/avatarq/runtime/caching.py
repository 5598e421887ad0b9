"""`CachingRuntime`: decode a bundle's Neural-Caching graphs frame by frame.

A bundle with a caching record (``avatarq distill-warp --bundle``) holds two graphs:
``cache`` (the full decoder, also emitting its features after a chosen block) and ``warp``
(a shallow network that produces frame t from the cache of an earlier frame r and the
change in z and view). Two ways to run them:

- ``mode="refresh"`` (one runner): frame 0 and every ``refresh_every``-th frame after it
  run the cache graph, whose texture is the full decoder's (exact); the frames in between
  are warped from the last cache (distance 1 .. refresh_every - 1). The mean latency per
  frame is ((N - 1) warp + 1 full) / N.
- ``mode="alternate"`` (two runners, the paper's pipeline): every frame t > 0 is warped
  from the cache of frame t - 1 while a second runner, on its own thread, runs the cache
  graph on frame t for the next frame. Each cache serves exactly one warp, and the latency
  a caller sees is the warp graph's (plus any wait for the previous cache when the cache
  graph is slower than the frame interval). On one device the two runners share its
  cores; the paper gives each its own GPU.

Each call decodes one time step of B independent streams (z [B, Z], view [B, 3]); the
batch size must stay the same between refreshes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, open_bundle
from avatarq.runtime.lifecycle import BundleRuntime

MODES = ("refresh", "alternate")


class CachingRuntime(BundleRuntime):
    """The cache and warp graphs of one bundle under ONNX Runtime, with the stream state.

    Use `open`; close with `close()` or a ``with`` block. Calls on one instance are
    serialized by a lock; open one instance per stream group.
    """

    def __init__(self, bundle: Bundle, mode: str, refresh_every: int, sessions: list[Any]) -> None:
        super().__init__(bundle)
        self.mode = mode
        self.refresh_every = refresh_every
        self._cache_session, self._warp_session = sessions[0], sessions[1]
        self._pool = ThreadPoolExecutor(1) if mode == "alternate" else None
        self._cache: dict[str, np.ndarray] | None = None
        self._pending: Future | None = None
        self._age = 0
        self.frames = 0
        self.warped = 0

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        mode: str = "refresh",
        refresh_every: int | None = None,
        device: str = "cpu",
        threads: int = 0,
    ) -> CachingRuntime:
        """Open the caching graphs of ``bundle`` (sha256 and I/O checked).

        Args:
            mode: ``refresh`` or ``alternate`` (see the module docstring).
            refresh_every: cache period N in frames for ``refresh`` (default: the
                manifest's ``refresh_every``); 1 decodes every frame in full.
            device: ``cpu``, ``cuda`` or ``auto`` (ONNX Runtime providers).
            threads: ONNX Runtime intra-op threads per graph (0: its default).
        """
        from avatarq.core.ort import make_session, resolve_device

        if mode not in MODES:
            raise AvatarqError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        opened = open_bundle(bundle)
        record = opened.manifest.caching
        if record is None:
            raise AvatarqError(
                f"bundle {opened.root} has no Neural-Caching graphs; add them with avatarq "
                "distill-warp --bundle"
            )
        n = record.refresh_every if refresh_every is None else refresh_every
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
            raise AvatarqError(f"refresh_every must be an integer in 1..10000, got {n!r}")
        device = resolve_device(device)
        sessions = [
            make_session(opened.caching_graph_path(which), device, threads)
            for which in ("cache", "warp")
        ]
        return cls(opened, mode, n, sessions)

    # -- running

    def run_cache(self, z: np.ndarray, view: np.ndarray) -> dict[str, np.ndarray]:
        texture, vertices, features = self._cache_session.run(None, {"z": z, "view": view})
        return {
            "texture": texture,
            "vertices": vertices,
            "features": features,
            "z": z,
            "view": view,
        }

    def run_warp(self, cache: dict[str, np.ndarray], z: np.ndarray, view: np.ndarray):
        feeds = {
            "features": cache["features"],
            "texture_ref": cache["texture"],
            "z_ref": cache["z"],
            "view_ref": cache["view"],
            "z": z,
            "view": view,
        }
        texture, vertices = self._warp_session.run(None, feeds)
        return texture, vertices

    def _check(self, z: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.bundle.manifest
        z = np.ascontiguousarray(z, dtype=np.float32)
        view = np.ascontiguousarray(view, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != m.z_dim:
            raise AvatarqError(f"z must be [B, {m.z_dim}], got {list(z.shape)}")
        if view.shape != (z.shape[0], 3):
            raise AvatarqError(f"view must be [{z.shape[0]}, 3], got {list(view.shape)}")
        if not (np.isfinite(z).all() and np.isfinite(view).all()):
            raise AvatarqError("z and view must be finite")
        if self._cache is not None and self._cache["z"].shape[0] != z.shape[0]:
            raise AvatarqError(
                f"batch changed from {self._cache['z'].shape[0]} to {z.shape[0]} streams; "
                "call reset() first"
            )
        return z, view

    def decode(self, z: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z float32 [B, Z], view float32 [B, 3]) of the next frame -> (texture float32
        [B, 3, T, T], vertices float32 [B, V, 3]) in the manifest's units."""
        if self._cache_session is None:
            raise AvatarqError("this CachingRuntime is closed")
        with self._lock:
            z, view = self._check(z, view)
            self.frames += 1
            if self.mode == "refresh":
                if self._cache is None or self._age >= self.refresh_every:
                    self._cache, self._age = self.run_cache(z, view), 1
                    # copies: the caller may change what it gets, the cache must not change
                    return self._cache["texture"].copy(), self._cache["vertices"].copy()
                self._age += 1
                self.warped += 1
                return self.run_warp(self._cache, z, view)
            if self._pending is None:  # the first frame of the stream: decode it in full
                first = self.run_cache(z, view)
                self._pending = _done(first)
                return first["texture"].copy(), first["vertices"].copy()
            cache = self._pending.result()
            assert self._pool is not None
            self._pending = self._pool.submit(self.run_cache, z, view)
            self.warped += 1
            return self.run_warp(cache, z, view)

    def reset(self) -> None:
        """Forget the cache (a new stream, a cut, or another batch size)."""
        with self._lock:
            if self._pending is not None:
                self._pending.result()
            self._cache = self._pending = None
            self._age = 0

    # -- lifecycle

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._cache_session = self._warp_session = None
        self._cache = self._pending = None

    def __repr__(self) -> str:
        return (
            f"CachingRuntime({str(self.bundle.root)!r}, mode={self.mode!r}, "
            f"refresh_every={self.refresh_every})"
        )


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
