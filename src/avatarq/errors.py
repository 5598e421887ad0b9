"""The two exception roots of avatarq.

`AvatarqError` is a user error: bad input, a missing file, a wrong checkpoint. The CLI
prints its message on one line and exits with code 2. Anything else is an internal bug
and keeps its traceback. Set ``AVATARQ_DEBUG=1`` to see tracebacks for user errors too.
"""

from __future__ import annotations


class AvatarqError(Exception):
    """A user-facing error. The message is one line that names what is wrong and a fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class InternalError(RuntimeError):
    """An avatarq bug: an invariant that should hold whatever the user passes."""
