"""A tiny random DAM exported to a bundle: the fixture model of the engine and runtime tests."""

from __future__ import annotations

from pathlib import Path

import torch

from avatarq.export import ExportOptions, export_bundle
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

TINY_CONFIG = DAMConfig(z_dim=16, tex_size=64, n_vertices=30, n_cams=4, has_encoder=False)


def export_tiny_dam(root: Path, bundle_name: str = "dam.avq") -> tuple[Path, Path]:
    """Write ``root/dam.pt`` (seeded random base DAM: z 16, texture 64, 30 vertices, weights
    perturbed off their initial values) and its unvalidated FP32 bundle; returns (bundle,
    checkpoint)."""
    torch.manual_seed(0)
    model = DeepAppearanceModel(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, root / "dam.pt")
    export_bundle(root / "dam.pt", root / bundle_name, options=ExportOptions(validate=False))
    return root / bundle_name, root / "dam.pt"
