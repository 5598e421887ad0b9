"""The oracle of the fuzz suite (tests/test_fuzz_*.py): what avatarq must do with any input.

For every input, good or malformed:

- no traceback: a library boundary raises nothing but `AvatarqError`; the CLI returns
  0, 1 (a gate failed) or 2 (a user error) and nothing else;
- an error is one line: exit code 2 prints exactly one line on stderr starting ``error: ``;
  a library error message is one line too;
- no warning leaks (numpy floating-point warnings, PIL's decompression-bomb warning, or any
  warning raised from avatarq's own code);
- nothing is left behind: a failed command writes no output, and no staging folder or
  temporary ``.partial`` file survives any command;
- no file that existed before is touched: every path under the watched folder keeps its
  kind, size, modification time and contents (a snapshot is compared before and after),
  except the files a successful command is documented to update.

`COUNTS` tallies the inputs tried per kind; the session prints it at the end (conftest.py),
which is where docs/benchmarks.md's "Robustness (fuzz suite)" numbers come from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from avatarq.errors import AvatarqError

#: Inputs tried per kind in this session (printed by conftest.py's terminal summary).
COUNTS: Counter[str] = Counter()

#: Examples per property; AVATARQ_FUZZ_SCALE=10 runs a ten times deeper fuzz.
SCALE = max(1, int(os.environ.get("AVATARQ_FUZZ_SCALE", "1")))


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of the suite: derandomized (the same inputs on every run, so CI
    is reproducible and the counts in docs/benchmarks.md hold), no example database, no
    deadline (the machine is shared), ``examples * AVATARQ_FUZZ_SCALE`` examples."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# --------------------------------------------------------------------------- JSON documents

#: Any JSON value, with path-like strings that would escape a folder.
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["../x", "/etc/passwd", "", ".", "engines/../../x", "model.onnx", "batch"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def locations(doc: Any, at: tuple = ()) -> list[tuple]:
    """Every place in a JSON document (the root excluded), as key/index paths."""
    out = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        out.append((*at, key))
        out += locations(value, (*at, key))
    return out


def mutate(doc: Any, where: tuple, how: str, value: Any) -> Any:
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    last = where[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    elif how == "nest":
        parent[last] = [[[[parent[last]]]]]
    return doc


# --------------------------------------------------------------------------- snapshots

Entry = tuple[str, int, int, str]  # (kind, size, mtime_ns, sha256 or link target)


def snapshot(root: str | Path) -> dict[str, Entry]:
    """Every path under ``root`` (links not followed): kind, size, mtime and a content hash."""
    root = Path(root)
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                out[rel] = ("link", 0, st.st_mtime_ns, os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", 0, 0, "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


@contextlib.contextmanager
def restored(*paths: Path):
    """Put each file of ``paths`` back as it was after the block (its bytes, or absent),
    whatever the block replaced it with: a folder, a link, nothing. Lets many inputs reuse
    one copy of a capture, bundle or artifact (creating thousands of files is slow)."""
    saved = {p: p.read_bytes() if p.is_file() and not p.is_symlink() else None for p in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            if data is not None:
                path.write_bytes(data)


def leftovers(root: str | Path) -> list[str]:
    """Temporary siblings avatarq writes through (``.<name>.<hex>.partial``) still on disk."""
    return sorted(rel for rel in snapshot(root) if ".partial" in Path(rel).name)


def assert_untouched(
    before: dict[str, Entry],
    root: str | Path,
    *,
    new_allowed: Callable[[str], bool] = lambda rel: False,
    changed_allowed: Callable[[str], bool] = lambda rel: False,
) -> None:
    """Every path of ``before`` is unchanged under ``root``, no temporary file is left, and
    every new path is one ``new_allowed`` accepts."""
    after = snapshot(root)
    assert leftovers(root) == [], f"left behind: {leftovers(root)}"
    touched = [
        rel for rel, entry in before.items() if after.get(rel) != entry and not changed_allowed(rel)
    ]
    assert touched == [], f"touched files that existed before: {touched}"
    new = [rel for rel in after if rel not in before and not new_allowed(rel)]
    assert new == [], f"left behind: {new}"


# --------------------------------------------------------------------------- warnings


def _leaks(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    """Warnings a user would see that no input may cause."""
    bad = []
    for w in caught:
        category = w.category.__name__
        ours = f"{os.sep}avatarq{os.sep}" in str(w.filename)
        if issubclass(w.category, RuntimeWarning) or category == "DecompressionBombWarning" or ours:
            bad.append(f"{category}: {w.message} ({w.filename}:{w.lineno})")
    return bad


@contextlib.contextmanager
def no_leaked_warnings():
    """Fail if a floating-point, decompression-bomb or avatarq warning is raised inside."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    leaks = _leaks(caught)
    assert leaks == [], f"{len(leaks)} warnings leaked, first: {leaks[:3]}"


# --------------------------------------------------------------------------- library boundary


def call(kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` under the oracle: returns its result, or the `AvatarqError` it raised
    (one line); any other exception or a leaked warning fails the test."""
    COUNTS[kind] += 1
    with no_leaked_warnings():
        try:
            return fn(*args, **kwargs)
        except AvatarqError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"not one line: {message!r}"
            return exc


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Outcome:
    """What one in-process ``avatarq`` run did."""

    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The message of a one-line error (without ``error: ``), else ''."""
        return self.err[len("error: ") :].rstrip("\n") if self.code == 2 else ""


def run_cli(kind: str, argv: list[Any], cwd: str | Path) -> Outcome:
    """Run ``avatarq ARGV`` in-process inside ``cwd`` and check the exit code and stderr
    (0, 1 or 2; a 2 is one ``error:`` line; 0 and 1 print nothing on stderr). An exception
    escaping `avatarq.cli.main` is a traceback and fails the test."""
    from avatarq.cli import main

    COUNTS[kind] += 1
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with no_leaked_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        os.chdir(old)
    outcome = Outcome(code, out.getvalue(), err.getvalue())
    assert code in (0, 1, 2), f"exit code {code} for {argv}: {outcome.err!r}"
    if code == 2:
        assert outcome.err.startswith("error: ") and outcome.err.count("\n") == 1, (
            f"a user error must be one 'error:' line on stderr, got {outcome.err!r} for {argv}"
        )
    else:
        assert outcome.err == "", f"stderr of a run that exited {code}: {outcome.err!r}"
    return outcome


def run_checked(
    kind: str,
    argv: list[Any],
    root: str | Path,
    *,
    expect: int | None = 2,
    new_allowed: Callable[[str], bool] = lambda rel: False,
    changed_allowed: Callable[[str], bool] = lambda rel: False,
) -> Outcome:
    """`run_cli` inside ``root`` plus the file-system oracle over ``root``: a failed run
    (exit 2) changes nothing; any run leaves no temporary file and touches no file that
    existed before except those ``changed_allowed`` names. ``expect`` pins the exit code."""
    before = snapshot(root)
    outcome = run_cli(kind, argv, root)
    if expect is not None:
        assert outcome.code == expect, (
            f"exit {outcome.code} for {argv}: {outcome.err or outcome.out}"
        )
    if outcome.code == 2:
        assert_untouched(before, root)
    else:
        assert_untouched(before, root, new_allowed=new_allowed, changed_allowed=changed_allowed)
    return outcome
