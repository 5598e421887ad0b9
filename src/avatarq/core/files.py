"""Writing files and folders so that nobody ever sees half of one.

Every file avatarq writes goes through a temporary sibling that is renamed into place
(`atomic_write_bytes`, `atomic_write_text`, `atomic_write_json`, `atomic_path`), and every
folder (a bundle, a calibration artifact, a report) is assembled in a staging sibling that
replaces the target in one rename (`StagedDirectory`). On an exception, Ctrl-C (SIGINT) or
SIGTERM (turned into `SystemExit` by `exit_on_sigterm`) the temporary parts are removed, so
an interrupted command leaves the file system as it found it.

Staging folders are created with the process umask (not mkdtemp's 0700), so a bundle written
by one user can be read by a service running as another.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from avatarq.errors import AvatarqError

PARTIAL = ".partial"


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into; renamed onto ``path`` on success.

    The parent folder is created if missing. On any exception (KeyboardInterrupt and
    SystemExit included) the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    created = make_parent(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise


def check_parent(path: str | Path) -> None:
    """AvatarqError when ``path`` could not be created because a file (or a link to
    nothing) sits where one of its parent folders belongs; nothing is created."""
    path = Path(path)
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise AvatarqError(f"cannot write {path}: {parent} is not a folder")


def make_parent(path: Path) -> list[Path]:
    """Create the folders above ``path``; returns those it created, deepest first (for
    `remove_empty`). A file (or a link to nothing) on the way is an AvatarqError naming it."""
    check_parent(path)
    created = [p for p in path.parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        check_parent(path)
        raise AvatarqError(f"cannot write {path}: {path.parent} is not a folder") from None
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) that are still empty: what a failed write created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Strict JSON (no NaN/Infinity literals), sorted as given, newline-terminated."""
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def _make_staging(target: Path) -> Path:
    for _ in range(100):
        staging = _temporary_sibling(target)
        try:
            staging.mkdir()  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700
        except FileExistsError:
            continue
        return staging
    raise AvatarqError(f"cannot create a staging folder next to {target}")


class StagedDirectory:
    """A folder assembled in a staging sibling, then moved onto ``target`` in one rename.

    Use as a context manager::

        with StagedDirectory(out, replace=force) as stage:
            atomic_write_json(stage.path / "calib.json", record)
            stage.commit()

    Leaving the block without `commit` (an exception, Ctrl-C, SIGTERM) deletes the staging
    folder and leaves ``target`` untouched. ``replace`` says whether an existing ``target``
    may be replaced; the caller decides first whether that target is something avatarq
    wrote (a bundle, an artifact) - `StagedDirectory` never judges what it deletes.
    """

    def __init__(self, target: str | Path, replace: bool = False) -> None:
        self.target = Path(target)
        self.replace = replace
        if self.target.exists() and not self.target.is_dir():
            raise AvatarqError(f"{self.target} exists and is not a folder; choose another output")
        if self.target.exists() and not replace:
            raise AvatarqError(f"{self.target} exists; pass --force to replace it")
        self._created = make_parent(self.target)
        self.path = _make_staging(self.target)
        self.committed = False

    def file(self, name: str) -> Path:
        """``staging/name`` with its parent folders created."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self) -> Path:
        """Move the staging folder onto ``target`` (replacing it if allowed); returns target."""
        if self.target.exists():
            if not self.replace:
                raise AvatarqError(f"{self.target} appeared while writing; not replacing it")
            old = _temporary_sibling(self.target)
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        self.committed = True
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        remove_empty(self._created)

    def __enter__(self) -> StagedDirectory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.abort()


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in the main thread, so `finally` blocks and the
    context managers above clean up as they do for Ctrl-C. Call once, from a command-line
    entry point (never from library code)."""
    signal.signal(signal.SIGTERM, _raise_system_exit)


def is_inside(root: str | Path, relative: str) -> bool:
    """Whether ``relative`` names a path inside ``root``: not absolute, no ``..`` escape, and
    no symbolic link on the way (checked on the resolved path)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or str(relative).strip() == "":
        return False
    root_resolved = Path(root).resolve()
    candidate = Path(root) / rel
    walked = Path(root)
    for part in rel.parts:
        walked = walked / part
        if walked.is_symlink():
            return False
    try:
        candidate.resolve().relative_to(root_resolved)
    except ValueError:
        return False
    return True


def inside(root: str | Path, relative: str, what: str) -> Path:
    """``root / relative`` if it stays inside ``root`` (see `is_inside`), else AvatarqError."""
    if not isinstance(relative, str) or not is_inside(root, relative):
        raise AvatarqError(f"{what} path {relative!r} points outside {root}; refusing to follow it")
    return Path(root) / relative


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path after checking that it names a regular file.

    Raises:
        AvatarqError: "WHAT not found: PATH" or "WHAT is not a file: PATH".
    """
    path = Path(path)
    if not path.exists():
        raise AvatarqError(f"{what} not found: {path}")
    if not path.is_file():
        raise AvatarqError(f"{what} is not a file: {path}")
    return path
