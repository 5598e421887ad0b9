"""The PyTorch decoder as a runner: the reference for comparisons and for GPU timing.

A bundle does not hold its checkpoint, so the torch runner is given the checkpoint path;
its sha256 must equal the one the manifest recorded, so the reference is the model the
bundle came from. The de-normalization a bundle folds in comes from the bundle's own
normalization arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avatarq.core.files import existing_file
from avatarq.engines.base import Runner, RunOptions
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, TensorSpec

BACKEND = "torch"
DEFAULT_MAX_BATCH = 8


class TorchRunner(Runner):
    """Runs `avatarq.models.DeployableDecoder` with torch.

    Args:
        checkpoint: a Multiface-format DAM checkpoint.
        inputs, outputs: tensor specs (None: derived from the checkpoint's config).
        capture: capture root; folds its de-normalization in (texture in 0..255 units).
        normalization: the de-normalization to fold in instead of a capture's
            (`avatarq.models.Normalization`).
        camera: fold this camera's colour correction in.
        fp16: run the decoder in float16; inputs and outputs stay float32.
        device: ``cpu`` or ``cuda``.
        max_batch: largest batch.
    """

    backend = BACKEND

    def __init__(
        self,
        checkpoint: str | Path,
        inputs: list[TensorSpec] | None = None,
        outputs: list[TensorSpec] | None = None,
        capture: str | Path | None = None,
        camera: int | None = None,
        normalization=None,  # noqa: ANN001 - avatarq.models.Normalization
        fp16: bool = False,
        device: str = "cpu",
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str = "",
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.capture = None if capture is None else Path(capture)
        self.normalization = normalization
        self.camera = camera
        self.fp16 = fp16
        self.device = device
        self.decoder = None
        self._pinned: list = []
        if inputs is None or outputs is None:
            from avatarq.models import read_state_dict
            from avatarq.models.checkpoint import infer_config, strip_prefix

            config = infer_config(strip_prefix(read_state_dict(self.checkpoint)))
            inputs, outputs = _specs(config.z_dim, config.tex_size, config.n_vertices)
        precision = "fp16" if fp16 else "fp32"
        super().__init__(inputs, outputs, max_batch, name or f"torch {precision} {device}")

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: RunOptions = RunOptions()) -> TorchRunner:
        """The checkpoint a bundle was exported from (``options.checkpoint``, verified)."""
        from avatarq.core.hashing import file_sha256

        m = bundle.manifest
        if options.checkpoint is None:
            raise AvatarqError(
                "the torch backend runs the checkpoint, which a bundle does not hold; "
                "pass the checkpoint the bundle was exported from (--checkpoint dam.pt)"
            )
        checkpoint = existing_file(options.checkpoint, "checkpoint")
        if file_sha256(checkpoint) != m.source_checkpoint_sha256:
            raise AvatarqError(
                f"checkpoint {checkpoint} is not the one {bundle.root} was exported from "
                f"(sha256 differs from the manifest's {m.source_checkpoint_sha256[:12]}...)"
            )
        normalization = None
        if m.normalization.folded:
            from avatarq.models import Normalization

            arrays = bundle.normalization_arrays()
            if arrays is None:
                raise AvatarqError(
                    f"{bundle.root} folds a de-normalization in but holds no normalization "
                    "arrays; re-export it with this avatarq"
                )
            normalization = Normalization(
                arrays["tex_mean"],
                float(arrays["tex_std"]),
                arrays["vert_mean"],
                float(arrays["vert_std"]),
            )
        return cls(
            checkpoint,
            m.inputs,
            m.outputs,
            normalization=normalization,
            camera=m.camera,
            fp16=options.fp16,
            device=options.resolved_device(),
            max_batch=options.max_batch or DEFAULT_MAX_BATCH,
        )

    def _activate(self) -> None:
        import torch

        from avatarq.models import DeployableDecoder, load_checkpoint

        if self.device == "cuda" and not torch.cuda.is_available():
            raise AvatarqError(
                "device cuda requested but torch sees no CUDA device; use --device cpu"
            )
        model = load_checkpoint(self.checkpoint)
        normalization = self.normalization
        if self.capture is not None:
            from avatarq.data.capture import MultifaceCapture
            from avatarq.data.encode import capture_normalization

            normalization = capture_normalization(MultifaceCapture(self.capture))
        decoder = DeployableDecoder(model, normalization, self.camera)
        dtype = torch.float16 if self.fp16 else torch.float32
        self.decoder = decoder.to(device=self.device, dtype=dtype).eval()
        self._dtype = dtype

    def _allocate(self, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
        if self.device != "cuda":
            return super()._allocate(spec, shape)
        import torch

        # Pinned host memory: device-to-host copies run at full speed and asynchronously.
        pinned = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self._pinned.append(pinned)
        return pinned.numpy()

    def _deactivate(self) -> None:
        self.decoder = None
        self._pinned = []

    def _run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batch: int
    ) -> None:
        import torch

        with torch.inference_mode():
            z = torch.from_numpy(inputs["z"]).to(self.device, self._dtype)
            view = torch.from_numpy(inputs["view"]).to(self.device, self._dtype)
            texture, vertices = self.decoder(z, view)
            torch.from_numpy(outputs["texture"]).copy_(texture)
            torch.from_numpy(outputs["vertices"]).copy_(vertices)


def _specs(z_dim: int, tex_size: int, n_vertices: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [
            TensorSpec("z", "float32", ["batch", z_dim], "latent code"),
            TensorSpec("view", "float32", ["batch", 3], "unit view direction"),
        ],
        [
            TensorSpec("texture", "float32", ["batch", 3, tex_size, tex_size], "RGB texture"),
            TensorSpec("vertices", "float32", ["batch", n_vertices, 3], "mesh vertices"),
        ],
    )
