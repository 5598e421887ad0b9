"""The one progress protocol of avatarq's long-running calls.

A long call takes ``progress: Progress | None`` and reports each phase as it goes::

    progress("calibrating dec.texture_decoder.upsample.3.conv1", 3, 12)  # a counted phase
    progress("tracing to ONNX")                                          # length unknown

``total`` None means the phase's length is unknown (a progress bar shows a spinner, not
"0/None"). `PhaseTimer` wraps a `Progress` and records the wall time of every phase, which
commands report in ``--json`` as a time breakdown.
"""

from __future__ import annotations

import time
from typing import Protocol


class Progress(Protocol):
    def __call__(self, phase: str, done: int = 0, total: int | None = None) -> None: ...


def silent(phase: str, done: int = 0, total: int | None = None) -> None:
    """A `Progress` that reports nothing."""


def or_silent(progress: Progress | None) -> Progress:
    return silent if progress is None else progress


class PhaseTimer:
    """A `Progress` that forwards to ``inner`` and times phases.

    A phase runs from its first report until the next phase's first report (or `stop`).
    Phases are keyed by ``key(phase)``: by default the text up to the first space, so
    "calibrating dec.a" and "calibrating dec.b" add up under "calibrating".
    """

    def __init__(self, inner: Progress | None = None, key=None) -> None:  # noqa: ANN001
        self.inner = or_silent(inner)
        self.key = key or (lambda phase: phase.split(" ", 1)[0])
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def __call__(self, phase: str, done: int = 0, total: int | None = None) -> None:
        key = self.key(phase)
        if key != self._current:
            self._close()
            self._current, self._since = key, time.perf_counter()
        self.inner(phase, done, total)

    def _close(self) -> None:
        if self._current is not None:
            elapsed = time.perf_counter() - self._since
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + elapsed
            self._current = None

    def stop(self) -> dict[str, float]:
        """End the current phase; seconds per phase, rounded to milliseconds."""
        self._close()
        return {k: round(v, 3) for k, v in self.seconds.items()}
