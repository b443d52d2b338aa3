"""Wall time per pipeline stage and peak memory, for the final summary and the benchmarks."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch


class StageTimer:
    """Accumulates seconds per named stage (read, forward, fit, write, ...). Stages nest, in
    one timer or across timers (a reduction's merge runs the shared neuron matching): the
    inner stage's time is its own, not also the outer's, so the stages add up to the work."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        # With HCCONVERT_STAGE_MEMORY=1 (the benchmarks): each stage's peak host memory.
        self.peaks: dict[str, int] = defaultdict(int)
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        opened = _open_stages()
        outer = opened[-1] if opened else None
        now = time.perf_counter()
        if outer is not None:  # the outer stage pauses while this one runs
            outer[0].seconds[outer[1]] += now - outer[2]
        opened.append([self, name, now])
        _reset_peak()
        try:
            yield
        finally:
            now = time.perf_counter()
            _, _, start = opened.pop()
            self.seconds[name] += now - start
            if STAGE_MEMORY:
                self.peaks[name] = max(self.peaks[name], _vm_hwm() or 0)
            if outer is not None:
                outer[2] = now

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.started


_threads = threading.local()
STAGE_MEMORY = os.environ.get("HCCONVERT_STAGE_MEMORY") == "1"
_highest = [0]  # the process's peak before the last reset of the kernel's counter


def _reset_peak() -> None:
    """Start a stage's own peak: Linux's VmHWM is reset by writing 5 to clear_refs; the
    process's peak so far is kept (peak_rss_bytes reports the larger)."""
    if not STAGE_MEMORY:
        return
    _highest[0] = max(_highest[0], _vm_hwm() or 0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _open_stages() -> list[list]:
    """This thread's open stages, innermost last: [timer, name, when it (last) resumed] (the
    writer's thread times its writes while the main thread computes)."""
    if not hasattr(_threads, "stages"):
        _threads.stages = []
    return _threads.stages


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux's VmHWM, not ru_maxrss: ru_maxrss survives exec, so a process started by a big
    parent reports the parent's size at fork as its own peak.
    """
    hwm = _vm_hwm()
    if hwm is not None:
        return max(hwm, _highest[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def process_seconds() -> float | None:
    """Seconds since this process started, interpreter start-up and imports included (what a
    user waits for); None where /proc does not say."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_gpu_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
