"""The one exception type the CLI turns into a one-line message and exit code 2, and the
warnings printed beside the progress."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


class UserError(Exception):
    """Bad input from the user: a missing file, an impossible option, an unsupported model.

    The message is a single line that says what is wrong and, where it helps, what to do.
    """


class ResumableError(UserError):
    """A failure outside the user's input that leaves the run resumable (a shard download in
    the middle of a run): a resumable run keeps its finished layers (writer.StagedOutput)."""


# The warnings said so far in a warnings_once() block (None outside one: every one is said).
_said: ContextVar[set[str] | None] = ContextVar("said", default=None)


def warn(message: str) -> None:
    """One warning line on stderr; within warnings_once(), a message only the first time (a
    command's preflight and its run check the same options)."""
    said = _said.get()
    if said is not None:
        if message in said:
            return
        said.add(message)
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def warnings_once() -> Iterator[None]:
    """A block (one command) in which each warning is said once."""
    token = _said.set(set())
    try:
        yield
    finally:
        _said.reset(token)
