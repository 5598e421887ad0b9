"""Reading .npz files that come from outside: every array checked before it is allocated.

`np.load` trusts a member's header: a few bytes may declare a shape of terabytes, which
numpy allocates before it finds the data missing, and object arrays are pickles. `load_npz`
reads each member's header first and refuses, in one line naming the file and the member,
anything that is not a plain .npy array of numbers or strings whose declared size the
archive really holds.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from avatarq.errors import AvatarqError

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def load_npz(path: str | Path, what: str = "arrays") -> dict[str, np.ndarray]:
    """{name: array} of the .npz file ``path`` (``what`` names it in errors).

    Raises:
        AvatarqError: the path is missing or not a file, the file is not a zip of .npy
            members, a member holds Python objects or another dtype than numbers, booleans
            and strings, or declares more bytes than the archive stores for it.
    """
    path = Path(path)
    if not path.is_file():
        raise AvatarqError(
            f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a file"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return {_key(path, info): _member(path, archive, info) for info in archive.infolist()}
    except AvatarqError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes
        reason = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else ""
        raise AvatarqError(
            f"{path} is not a readable .npz ({type(exc).__name__}{': ' + reason if reason else ''})"
        ) from None


def _key(path: Path, info: zipfile.ZipInfo) -> str:
    if not info.filename.endswith(".npy"):
        raise AvatarqError(f"{path}: member {info.filename!r} is not a .npy array")
    return info.filename[: -len(".npy")]


def _member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    name = info.filename[: -len(".npy")]
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise AvatarqError(
                f"{path}: array {name!r} has .npy version {version}; expected 1.0/2.0"
            )
        shape, _, dtype = _HEADER_READERS[version](f)
    if dtype.hasobject or dtype.kind not in "biufcSU":
        raise AvatarqError(
            f"{path}: array {name!r} has dtype {dtype}; expected numbers or strings (no objects)"
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise AvatarqError(
            f"{path}: array {name!r} declares shape {list(shape)} ({declared} bytes) but the "
            f"file stores {info.file_size} bytes for it"
        )
    with archive.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)
