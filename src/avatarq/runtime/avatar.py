"""`AvatarRuntime`: a bundle opened for decoding (and rendering) inside an application."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.engines.base import Runner, RunOptions
from avatarq.engines.registry import open_runner, resolve_backend
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, Manifest, open_bundle
from avatarq.measure.latency import LatencyStats
from avatarq.runtime.lifecycle import BundleRuntime


class AvatarRuntime(BundleRuntime):
    """A decoder ready to run: one bundle, one backend, one runner.

    Thread-safe per instance: calls are serialized by a lock, and by default the outputs
    are copied out of the runner's buffers before the lock is released. Open one instance
    per thread for parallel decoding.

    Use `open`; close with `close()` or a ``with`` block.
    """

    def __init__(self, bundle: Bundle, backend: str, runner: Runner) -> None:
        super().__init__(bundle)
        self.backend = backend
        self.runner = runner
        self._renderers: dict[Any, Any] = {}
        self._codebook: Any = None

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        options: RunOptions | None = None,
        **option_fields: Any,
    ) -> AvatarRuntime:
        """Open ``bundle`` with ``backend`` and load it.

        Args:
            bundle: a bundle directory (``avatarq export``; engines from ``avatarq build``).
            backend: ``auto`` (the best engine built for this machine, else model.onnx under
                ONNX Runtime), or a backend name: onnxruntime, onnx, tensorrt, tensorrt-rtx,
                torch.
            options: `RunOptions`; keyword arguments override its fields
                (e.g. ``threads=2``, ``checkpoint="dam.pt"``).

        Raises:
            AvatarqError: not a bundle; unknown or unavailable backend; the bundle has no
                engine for the backend; the engine file is missing or corrupt; it was built
                by another library version or for another GPU.
        """
        opened = open_bundle(bundle)
        options = options if options is not None else RunOptions()
        if option_fields:
            unknown = sorted(set(option_fields) - set(RunOptions.__dataclass_fields__))
            if unknown:
                raise AvatarqError(f"unknown runtime option(s) {unknown}")
            options = replace(options, **option_fields)
        name = resolve_backend(opened, backend)
        runner = open_runner(opened, name, options)
        runner.activate()
        return cls(opened, name, runner)

    # -- description

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def z_dim(self) -> int:
        return self.manifest.z_dim

    @property
    def max_batch(self) -> int:
        return self.runner.max_batch

    def latency(self) -> LatencyStats:
        """Wall-clock statistics of the decode calls so far (ms per call)."""
        if not self.runner.timings_ms:
            raise AvatarqError("no decode call timed yet")
        return LatencyStats.from_samples(list(self.runner.timings_ms))

    @property
    def codebook(self):  # -> avatarq.codec.Codebook
        """The bundle's latent-stream codebook (sha256-checked on first use).

        Raises:
            AvatarqError: the bundle has none (``avatarq vq --bundle``) or it is corrupt.
        """
        if self._codebook is None:
            self._codebook = self.bundle.codebook()
        return self._codebook

    def encode_latents(self, z: np.ndarray) -> np.ndarray:
        """Sender side: z float32 [B, Z] -> codes uint16 [B, G, S] of the bundle's codebook
        (`avatarq.codec.pack_codes` turns them into bits_per_frame bits a frame)."""
        return self.codebook.encode(z)

    def decode_codes(
        self, codes: np.ndarray, view: np.ndarray, copy: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Receiver side: codes [B, G, S] (from `encode_latents` or `unpack_codes`) and view
        float32 [B, 3] -> (texture, vertices) as `decode` returns them for the z the codes
        stand for."""
        return self.decode(self.codebook.decode(codes), view, copy=copy)

    # -- running

    def decode(
        self, z: np.ndarray, view: np.ndarray, copy: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(z float32 [B, Z], view float32 [B, 3]) -> (texture float32 [B, 3, T, T],
        vertices float32 [B, V, 3]).

        Units and orientation are the manifest's (``manifest.outputs[i].meaning``): with the
        capture's de-normalization folded in, texture in 0..255 with row 0 = uv v 0, vertices
        in the capture's units. ``copy=False`` returns views of the runner's buffers, valid
        until the next call on this instance (one thread only).
        """
        if self.runner is None:
            raise AvatarqError("this AvatarRuntime is closed")
        with self._lock:
            texture, vertices = self.runner.decode(z, view)
            if copy:
                texture, vertices = texture.copy(), vertices.copy()
        return texture, vertices

    def render(self, z: np.ndarray, view: np.ndarray, M: Any, config: Any = None):
        """Decode and render with `avatarq.render` (the bundle's topology.npz).

        Args:
            z, view: as in `decode`.
            M: float [B, 3, 4] pixel projection per image (numpy or torch).
            config: `avatarq.render.RenderConfig` (default: Multiface's capture setting).

        Returns:
            `avatarq.render.RenderOutput`: image float32 [B, H, W, 3] in the texture's units,
            mask [B, H, W].
        """
        import torch

        from avatarq.render import RenderConfig, Renderer

        config = config if config is not None else RenderConfig()
        renderer = self._renderers.get(config)
        if renderer is None:
            renderer = self._renderers[config] = Renderer(self.bundle.topology(), config)
        texture, vertices = self.decode(z, view)
        projection = torch.as_tensor(np.asarray(M, dtype=np.float32))
        return renderer.render(torch.from_numpy(vertices), torch.from_numpy(texture), projection)

    # -- lifecycle

    def _release(self) -> None:
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None

    def __repr__(self) -> str:
        return f"AvatarRuntime({str(self.bundle.root)!r}, backend={self.backend!r})"
