"""Check an exported graph against the PyTorch decoder it came from, with ONNX Runtime on the CPU."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatarq.errors import AvatarqError


@dataclass(frozen=True)
class ValidationResult:
    """ONNX Runtime output vs the PyTorch reference on the same inputs.

    Errors are in the texture's own units; PSNR uses ``peak`` (255 for a de-normalized
    texture in 0..255 units, else the reference's peak-to-peak range). The result is truthy
    when it meets the tolerances it was judged against.
    """

    texture_max_abs_error: float
    texture_mean_abs_error: float
    texture_psnr_db: float
    vertices_max_abs_error: float
    peak: float
    n_samples: int
    min_psnr_db: float
    max_abs_error: float | None

    def __bool__(self) -> bool:
        ok = self.texture_psnr_db >= self.min_psnr_db
        if self.max_abs_error is not None:
            ok = ok and self.texture_max_abs_error <= self.max_abs_error
        return ok

    def to_dict(self) -> dict:
        data = asdict(self)
        if math.isinf(data["texture_psnr_db"]):
            data["texture_psnr_db"] = "inf"
        data["passed"] = bool(self)
        return data

    def summary(self) -> str:
        psnr = "inf" if math.isinf(self.texture_psnr_db) else f"{self.texture_psnr_db:.1f}"
        return (
            f"texture max|err| {self.texture_max_abs_error:.3g}, PSNR {psnr} dB "
            f"(need >= {self.min_psnr_db:g}), vertices max|err| {self.vertices_max_abs_error:.3g}"
        )


def onnx_session(model_path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session for ``model_path`` (threads 0 = ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        first = str(exc).strip().splitlines()[0][:200]
        raise AvatarqError(f"ONNX Runtime cannot load {model_path}: {first}") from None


def validate_against_torch(
    model_path: str | Path,
    reference: nn.Module,
    z: torch.Tensor,
    view: torch.Tensor,
    denormalized: bool,
    min_psnr_db: float,
    max_abs_error: float | None = None,
    batch: int = 4,
) -> ValidationResult:
    """Run ``model_path`` with ORT and ``reference`` with torch on z [N,Z], view [N,3]."""
    session = onnx_session(model_path)
    errs, sq, abs_sum, count, vmax = [], 0.0, 0.0, 0, 0.0
    ref_min, ref_max = math.inf, -math.inf
    with torch.no_grad():
        for start in range(0, z.shape[0], batch):
            zb, vb = z[start : start + batch], view[start : start + batch]
            ref_tex, ref_vert = (t.double().numpy() for t in reference(zb, vb))
            tex, vert = session.run(None, {"z": zb.numpy(), "view": vb.numpy()})
            diff = tex.astype(np.float64) - ref_tex
            errs.append(np.abs(diff).max())
            sq += float(np.sum(diff**2))
            count += diff.size
            vmax = max(vmax, float(np.abs(vert - ref_vert).max()))
            ref_min, ref_max = min(ref_min, ref_tex.min()), max(ref_max, ref_tex.max())
            abs_sum += float(np.abs(diff).sum())
    peak = 255.0 if denormalized else float(ref_max - ref_min)
    mse = sq / count
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    return ValidationResult(
        texture_max_abs_error=float(max(errs)),
        texture_mean_abs_error=abs_sum / count,
        texture_psnr_db=psnr,
        vertices_max_abs_error=vmax,
        peak=peak,
        n_samples=int(z.shape[0]),
        min_psnr_db=min_psnr_db,
        max_abs_error=max_abs_error,
    )
