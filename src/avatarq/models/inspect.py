"""Describe a checkpoint for `avatarq info`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avatarq.models.checkpoint import load_checkpoint
from avatarq.models.config import DAMConfig
from avatarq.models.dam import count_parameters
from avatarq.models.deploy import DeployableDecoder


@dataclass(frozen=True)
class CheckpointDescription:
    """What a checkpoint holds.

    Attributes:
        path: the checkpoint file.
        config: the architecture read from its weights.
        parameters: parameter count per component (enc, dec, cc, warp, ...) and ``total``.
        deployed_parameters: parameters of the decoder as exported (weight norm folded).
        deployed_fp32_mb: their size in float32, megabytes (1e6 bytes).
    """

    path: str
    config: DAMConfig
    parameters: dict[str, int]
    deployed_parameters: int
    deployed_fp32_mb: float

    @property
    def family(self) -> str:
        return "PiCA-style decoder" if self.config.arch == "pica" else "Multiface DAM"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_checkpoint(path: str | Path) -> CheckpointDescription:
    """Config, parameter counts per component (enc, dec, cc, warp, total) and deployed size."""
    model = load_checkpoint(path)
    parts = {name: count_parameters(module) for name, module in model.named_children()}
    parts["total"] = count_parameters(model)
    n_deployed = count_parameters(DeployableDecoder(model))
    return CheckpointDescription(str(path), model.config, parts, n_deployed, n_deployed * 4 / 1e6)
