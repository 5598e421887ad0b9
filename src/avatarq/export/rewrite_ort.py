"""Compatibility name of `avatarq.export.ort_rewrite` (the ONNX Runtime engine rewrite),
plus `default_calibration_feeds`, seeded inputs for any decoder graph."""

from __future__ import annotations

import numpy as np
import onnx

from avatarq.export.ort_rewrite import *  # noqa: F403
from avatarq.export.ort_rewrite import __all__ as _package_all


def default_calibration_feeds(
    model: onnx.ModelProto, n: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs: N(0, 1) for every input but ``view`` (unit vectors around +z)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
        if value.name == "view":
            v = rng.normal(size=(n, 3)) * 0.3 + np.array([0.0, 0.0, 1.0])
            feeds["view"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        else:
            feeds[value.name] = rng.standard_normal((n, *dims)).astype(np.float32)
    return feeds


__all__ = [*_package_all, "default_calibration_feeds"]
