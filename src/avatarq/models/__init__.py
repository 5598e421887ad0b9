"""Decoder architectures (the Multiface DAM family) and checkpoint loading."""

from avatarq.models.checkpoint import (
    infer_config,
    load_checkpoint,
    model_from_state_dict,
    read_state_dict,
    save_checkpoint,
)
from avatarq.models.config import ARCHS, DAMConfig
from avatarq.models.dam import DeepAppearanceModel, count_parameters
from avatarq.models.deploy import DeployableDecoder, Normalization, fold_weight_norm

__all__ = [
    "ARCHS",
    "DAMConfig",
    "DeepAppearanceModel",
    "DeployableDecoder",
    "Normalization",
    "count_parameters",
    "fold_weight_norm",
    "infer_config",
    "load_checkpoint",
    "model_from_state_dict",
    "read_state_dict",
    "save_checkpoint",
]
