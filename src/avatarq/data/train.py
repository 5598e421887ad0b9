"""Train a Deep Appearance Model on a capture, the way Multiface does, small enough for a CPU.

Used to make the embedded synthetic avatar's decoder: quantization error and jitter behave
differently on trained weights than on random ones, so the demo, the tests and the
benchmarks all run on a decoder that has really learned its avatar.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from avatarq.core.progress import Progress
from avatarq.data.capture import AVERAGE, MultifaceCapture
from avatarq.data.encode import resize_texture
from avatarq.errors import AvatarqError
from avatarq.models.config import DAMConfig
from avatarq.models.dam import DeepAppearanceModel


@dataclass(frozen=True)
class TrainConfig:
    """DAM training settings.

    Attributes:
        arch, z_dim, tex_size: the model to train (tex_size may be below the capture's).
        iters: optimizer steps; batch: samples (frame, camera) per step.
        lr: Adam learning rate, cosine-decayed to lr/20.
        kl_weight, mesh_weight: loss weights of the KL term and the mesh L2 term.
        threads: torch CPU threads (0 = torch's default).
    """

    arch: str = "base"
    z_dim: int = 64
    tex_size: int = 256
    iters: int = 400
    batch: int = 8
    lr: float = 2e-3
    kl_weight: float = 1e-3
    mesh_weight: float = 1.0
    seed: int = 0
    threads: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise AvatarqError(f"training config version must be 1, got {self.version!r}")
        for name, low, high in (
            ("iters", 1, 10_000_000),
            ("batch", 1, 4096),
            ("seed", 0, 2**32 - 1),
            ("threads", 0, 1024),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise AvatarqError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        for name, positive in (("lr", True), ("kl_weight", False), ("mesh_weight", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and math.isfinite(value)
            if not ok or value < 0 or (positive and value == 0):
                kind = "a positive" if positive else "a non-negative"
                raise AvatarqError(f"{name} must be {kind} finite number, got {value!r}")
        # the model itself: arch, latent and texture sizes (DAMConfig's own checks)
        DAMConfig(arch=self.arch, z_dim=self.z_dim, tex_size=self.tex_size, n_vertices=1, n_cams=1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    texture_losses: list[float] = field(default_factory=list)
    mesh_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class _CaptureTensors:
    """All training frames of a capture held in memory at the training texture size."""

    def __init__(self, capture: MultifaceCapture, tex_size: int) -> None:
        cams = list(capture.cameras)
        self.n_cams = len(cams)

        def small(a: np.ndarray) -> torch.Tensor:
            return resize_texture(torch.from_numpy(a)[None], tex_size)[0]

        avg, mesh, tex, valid, view, cam_idx, frame_idx = [], [], [], [], [], [], []
        for fi, (seg, fid) in enumerate(capture.frames):
            avg.append(small(capture.normalized_texture(seg, fid, AVERAGE)))
            mesh.append(capture.normalized_vertices(seg, fid))
            for ci, cam in enumerate(cams):
                if not capture.has_texture(seg, fid, cam):
                    continue
                raw = capture.texture(seg, fid, cam)
                tex.append(small(capture.normalized_texture(seg, fid, cam)))
                seen = (raw.sum(0, keepdims=True) > 0).astype(np.float32)
                # A texel counts only if everything it averages over was seen.
                valid.append((small(seen) > 0.99).float())
                view.append(capture.view_direction(seg, fid, cam))
                cam_idx.append(ci)
                frame_idx.append(fi)
        if not tex:
            raise AvatarqError(f"capture {capture.root} has no per-camera textures to train on")
        self.avg = torch.stack(avg)
        self.mesh = torch.from_numpy(np.stack(mesh))
        self.tex = torch.stack(tex)
        self.valid = torch.stack(valid)
        self.view = torch.from_numpy(np.stack(view))
        self.cam = torch.tensor(cam_idx)
        self.frame = torch.tensor(frame_idx)

    def __len__(self) -> int:
        return int(self.tex.shape[0])


def train_dam(
    capture: MultifaceCapture,
    config: TrainConfig,
    progress: Progress | None = None,
) -> tuple[DeepAppearanceModel, TrainReport]:
    """Train a DAM on every (frame, camera) texture of ``capture``; returns it in eval mode.

    Loss per sample: masked MSE of the colour-corrected texture against the camera's
    unwrapped texture (texels the camera did not see are ignored) + mesh_weight * MSE of
    the mesh + kl_weight * KL, all in Multiface-normalized units.
    """
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = _CaptureTensors(capture, config.tex_size)
    model_config = DAMConfig(
        arch=config.arch,
        z_dim=config.z_dim,
        tex_size=config.tex_size,
        n_vertices=capture.vert_mean.size // 3,
        n_cams=data.n_cams,
    )
    model = DeepAppearanceModel(model_config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    report = TrainReport()
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for step in range(config.iters):
        lr = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.iters)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data), (config.batch,), generator=gen)
        f = data.frame[idx]
        tex, mesh, kl = model(
            data.avg[f], data.mesh[f].view(len(idx), -1, 3), data.view[idx], data.cam[idx]
        )
        mask = data.valid[idx]
        tex_loss = ((tex - data.tex[idx]) ** 2 * mask).sum() / (mask.sum() * 3).clamp(min=1)
        mesh_loss = ((mesh.flatten(1) - data.mesh[f]) ** 2).mean()
        loss = tex_loss + config.mesh_weight * mesh_loss + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(loss.item())
        report.texture_losses.append(tex_loss.item())
        report.mesh_losses.append(mesh_loss.item())
        if progress is not None:
            progress(f"training (loss {report.losses[-1]:.4f})", step + 1, config.iters)
    report.seconds = time.perf_counter() - start
    return model.eval(), report
