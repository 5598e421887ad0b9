"""Reading the JSON documents avatarq writes (manifests, reports) with one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from avatarq.errors import AvatarqError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored at ``path``; malformed JSON or another top-level type is an
    AvatarqError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AvatarqError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AvatarqError(f"{path} must hold a JSON object")
    return data


def json_float(x: float) -> float | str:
    """A float for strict JSON: finite numbers as they are, non-finite ones as the strings
    "NaN", "Infinity", "-Infinity" (read back by Python's float() and JavaScript's Number())."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
