"""Train a Deep Appearance Model on a capture, the way Multiface does, small enough for a CPU.

Used to make the embedded synthetic avatar's decoder: quantization error and jitter behave
differently on trained weights than on random ones, so the demo, the tests and the
benchmarks all run on a decoder that has really learned its avatar.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarq.core.files import atomic_path
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
    """Per-step losses (normalized units) and what they compare with.

    Attributes:
        losses, texture_losses, mesh_losses: one value per optimizer step.
        seconds: wall time of the steps (summed over resumed runs).
        mean_texture_loss: the texture loss of predicting, for every sample, the per-texel
            mean of all training targets (seen texels only): the best a decoder that ignores
            its latent code can do. A trained decoder's texture loss must be well below it.
    """

    losses: list[float] = field(default_factory=list)
    texture_losses: list[float] = field(default_factory=list)
    mesh_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    mean_texture_loss: float | None = None


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

    def mean_texture_loss(self, chunk: int = 16) -> float:
        """Masked MSE of the per-texel mean target against every target (float64 sums)."""
        n = len(self)
        total = torch.zeros_like(self.tex[0], dtype=torch.float64)
        count = torch.zeros_like(self.valid[0], dtype=torch.float64)
        for i in range(0, n, chunk):
            m = self.valid[i : i + chunk].double()
            total += (self.tex[i : i + chunk].double() * m).sum(0)
            count += m.sum(0)
        mean = (total / count.clamp(min=1)).float()
        err = 0.0
        for i in range(0, n, chunk):
            d = (self.tex[i : i + chunk] - mean) ** 2 * self.valid[i : i + chunk]
            err += float(d.double().sum())
        return err / max(float(count.sum()) * 3, 1.0)


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, config: TrainConfig) -> dict | None:
    """The saved training state at ``path`` when it was made with ``config``, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("config") != config.to_dict():
        return None
    return state


def train_dam(
    capture: MultifaceCapture,
    config: TrainConfig,
    progress: Progress | None = None,
    *,
    state_path: str | Path | None = None,
    state_every: int = 25,
) -> tuple[DeepAppearanceModel, TrainReport]:
    """Train a DAM on every (frame, camera) texture of ``capture``; returns it in eval mode.

    Loss per sample: masked MSE of the colour-corrected texture against the camera's
    unwrapped texture (texels the camera did not see are ignored) + mesh_weight * MSE of
    the mesh + kl_weight * KL, all in Multiface-normalized units.

    With ``state_path``, the model, optimizer, sampler and report are saved there every
    ``state_every`` steps (atomically), and a run that finds a state saved with the same
    ``config`` continues from it: an interrupted long training resumes where it stopped
    and ends with the same weights as an uninterrupted one. The file is left in place.
    """
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    if state_every < 1:
        raise AvatarqError(f"state_every must be >= 1, got {state_every}")
    data = _CaptureTensors(capture, config.tex_size)
    model_config = DAMConfig(
        arch=config.arch,
        z_dim=config.z_dim,
        tex_size=config.tex_size,
        n_vertices=capture.vert_mean.size // 3,
        n_cams=data.n_cams,
    )
    model = DeepAppearanceModel(model_config).train()
    if config.arch == "pica":  # each vertex reads the position map at its uv
        from avatarq.models.pica import vertex_uvs

        topo = capture.topology
        model.dec.set_vertex_uv(
            vertex_uvs(topo.vert_ids, topo.uv_ids, topo.uvs, model_config.n_vertices)
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    report = TrainReport()
    gen = torch.Generator().manual_seed(config.seed)
    first = 0
    state_path = None if state_path is None else Path(state_path)
    saved = None if state_path is None else _load_state(state_path, config)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])  # the KL sampling noise
        report = TrainReport(**saved["report"])
        first = int(saved["step"])
    if report.mean_texture_loss is None:
        report.mean_texture_loss = data.mean_texture_loss()
    start = time.perf_counter() - report.seconds
    for step in range(first, config.iters):
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
        done = step + 1
        if state_path is not None and (done % state_every == 0 or done == config.iters):
            report.seconds = time.perf_counter() - start
            _save_state(
                state_path,
                {
                    "config": config.to_dict(),
                    "step": done,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "report": asdict(report),
                },
            )
    report.seconds = time.perf_counter() - start
    return model.eval(), report
