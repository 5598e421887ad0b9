"""Shared fixtures: a small synthetic avatar (capture + trained DAM) made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avatarq.data.synthetic import SyntheticAvatar, make_synthetic_avatar
from avatarq.data.synthetic_capture import SyntheticCaptureConfig
from avatarq.data.train import TrainConfig

SMALL_CAPTURE = SyntheticCaptureConfig(
    texture_size=64,
    n_cameras=3,
    segment_frames=(6, 6),
    image_height=256,
    image_width=168,
    mesh_bands=16,
    mesh_sectors=24,
    camera_textures_per_frame=3,
)
SMALL_TRAINING = TrainConfig(z_dim=16, tex_size=64, iters=150, batch=8, lr=2e-3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_avatar(tmp_path_factory) -> SyntheticAvatar:
    """A 64x64-texture synthetic capture and a base DAM trained on it for 150 steps."""
    return make_synthetic_avatar(tmp_path_factory.mktemp("avatar"), SMALL_CAPTURE, SMALL_TRAINING)


@pytest.fixture(scope="session")
def small_bundle(small_avatar, tmp_path_factory) -> Path:
    """An FP32 bundle of the small avatar with normalization and topology folded in."""
    from avatarq.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "dam_fp32.avq"
    export_bundle(small_avatar.checkpoint, out, small_avatar.capture_root)
    return out


@pytest.fixture(scope="session")
def fuzz_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(dam.pt, dam_fp32.avq): a seeded random base DAM (z 4, texture 16, 6 vertices, no
    encoder) and its unvalidated FP32 bundle, the smallest inputs the fuzz suite perturbs.
    Tests copy them before changing anything."""
    from avatarq.export import ExportOptions, export_bundle
    from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    config = DAMConfig(z_dim=4, tex_size=16, n_vertices=6, n_cams=2, has_encoder=False)
    save_checkpoint(DeepAppearanceModel(config).eval(), folder / "dam.pt")
    export_bundle(folder / "dam.pt", folder / "dam_fp32.avq", options=ExportOptions(validate=False))
    return folder / "dam.pt", folder / "dam_fp32.avq"


def pytest_terminal_summary(terminalreporter):
    """How many inputs the fuzz suite (tests/test_fuzz_*.py) tried, by kind."""
    import sys

    oracle = sys.modules.get("fuzz_oracle")
    if oracle is None or not oracle.COUNTS:
        return
    counts = oracle.COUNTS
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    terminalreporter.write_line(f"fuzz suite: {sum(counts.values())} inputs ({kinds})")
