"""sha256 digests of files and arrays (hex strings), the identities avatarq records."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_with_array(digest: Any, array: np.ndarray, label: str = "") -> None:
    """Feed ``label``, dtype, shape and the little-endian bytes of ``array`` to ``digest``."""
    a = np.ascontiguousarray(array)
    digest.update(f"{label}{a.dtype.str}{list(a.shape)}".encode())
    digest.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
