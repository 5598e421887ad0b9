"""Describe a checkpoint for `avatarq info`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from avatarq.models.checkpoint import load_checkpoint
from avatarq.models.dam import count_parameters
from avatarq.models.deploy import DeployableDecoder


def describe_checkpoint(path: str | Path) -> dict:
    """Config, parameter counts per component (enc, dec, cc, warp, total) and deployed size."""
    model = load_checkpoint(path)
    parts = {name: count_parameters(module) for name, module in model.named_children()}
    parts["total"] = count_parameters(model)
    deployed = DeployableDecoder(model)
    n_deployed = count_parameters(deployed)
    return {
        "path": str(path),
        "config": asdict(model.config),
        "parameters": parts,
        "deployed_parameters": n_deployed,
        "deployed_fp32_mb": n_deployed * 4 / 1e6,
    }
