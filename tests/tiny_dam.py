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


def tiny_calibration_decoder(seed: int = 0):
    """A 16x16-texture deployable decoder (z 8, 10 vertices) whose texel biases are random,
    so every layer's activations have structure worth calibrating."""
    from avatarq.models import DeployableDecoder

    torch.manual_seed(seed)
    model = DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=16, n_vertices=10, n_cams=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("conv1.bias", "conv2.bias")):
                p.normal_(0, 0.3)
    return DeployableDecoder(model)


def tiny_calibration_samples(n: int):
    """``n`` seeded (z [n, 8], unit view [n, 3]) samples without cameras."""
    from avatarq.calibration import CalibrationSamples

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(n, 8, generator=gen)
    view = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) + 2, dim=1)
    return CalibrationSamples.of(z, view, tuple(("s", str(i), "c") for i in range(n)))


def repin_graph(bundle: Path) -> Path:
    """Record the sha256 of a bundle's (hand-replaced) model.onnx in its manifest, as a
    test that swaps the graph must; returns the bundle."""
    from avatarq.core.hashing import file_sha256
    from avatarq.export import open_bundle

    opened = open_bundle(bundle)
    opened.manifest.model_sha256 = file_sha256(bundle / "model.onnx")
    opened.save_manifest()
    return bundle
