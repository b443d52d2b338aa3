"""Termination signals as exceptions, so that every cleanup path that handles Ctrl-C also
handles the SIGTERM and SIGHUP that `timeout`, Slurm, systemd and `docker stop` send.

The CLI installs the handlers for the length of a command. Python runs signal handlers in the
main thread only, so the exception always surfaces there, whatever thread received the signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Signals received while held (see held_signals); None when signals are not being held.
_held: list[int] | None = None


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived; raised in the main thread like Ctrl-C's KeyboardInterrupt.

    `published` is true when it was held back until an output had been published; `kept`
    names the staging directory left for a resumed run (staging.StagedOutput), if any;
    `dropped` says a resumable run stopped without --resume removed its finished layers.
    """

    def __init__(self, signum: int, published: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.published = published
        self.kept: Path | None = None
        # A resumable run stopped without --resume: its finished layers were removed.
        self.dropped = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _interrupt(signum: int, frame) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its handlers stay as they are
        return
    # A signal the caller ignores stays ignored: `nohup` ignores SIGHUP so that the run
    # outlives its terminal, and a shell's background job ignores SIGINT.
    previous = {signum: signal.signal(signum, _interrupt) for signum in TERMINATING
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def held_signals() -> Iterator[list[int]]:
    """Hold termination signals back for the block (a publish must not stop half way); yields
    the list of the signals that arrived meanwhile, for the caller to act on afterwards."""
    global _held
    outer = _held
    received: list[int] = [] if outer is None else outer
    _held = received
    try:
        yield received
    finally:
        _held = outer
