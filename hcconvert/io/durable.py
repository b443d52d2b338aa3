"""Writes that survive a power cut (sync, then rename), and the tests' kill points."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Tests' fault injection: the process kills itself at the named point (kill_point).
KILL_AT_VARIABLE = "HCCONVERT_TEST_KILL_AT"

KILL_SIGNAL_VARIABLE = "HCCONVERT_TEST_KILL_SIGNAL"


def kill_point(name: str) -> None:
    """Die here when HCCONVERT_TEST_KILL_AT names this point (with SIGKILL, or the signal
    HCCONVERT_TEST_KILL_SIGNAL names): how the tests stop a run where a power cut could."""
    if os.environ.get(KILL_AT_VARIABLE) == name:
        signum = signal.Signals[os.environ.get(KILL_SIGNAL_VARIABLE, "SIGKILL")]
        os.kill(os.getpid(), signum)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, sync, rename: a reader sees the old file or the new, whole."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename or a new file in directory survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
