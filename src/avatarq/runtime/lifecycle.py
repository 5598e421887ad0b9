"""What every runtime shares: one opened bundle, a lock that serializes calls on an
instance, and a `close` (also at the end of a ``with`` block) that releases what it holds."""

from __future__ import annotations

import abc
import threading
from typing import TypeVar

from avatarq.export.bundle import Bundle

R = TypeVar("R", bound="BundleRuntime")


class BundleRuntime(abc.ABC):
    """Base of `AvatarRuntime` and `CachingRuntime`: ``bundle`` and the call lock."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _release(self) -> None:
        """Free sessions, runners and threads; called under the lock, maybe more than once."""

    def close(self) -> None:
        """Release what the runtime holds (idempotent)."""
        with self._lock:
            self._release()

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
