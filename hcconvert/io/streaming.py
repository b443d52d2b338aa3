"""Overlapping disk and compute: read the next layer and write the last one in the background.

At most three layers' tensors are in host memory at once: the one being read, the one being
computed, and the one being written. Each background stage is a single thread, so reads and
writes keep their order; torch and safetensors release the GIL during the heavy copies.

When the CPU computes, the reading thread runs no torch op: torch parallelises an op over an
OpenMP team of its calling thread, so a second thread's ops contend with the computation's
team for the cores. On a 2-core CPU, checking each layer for NaN in the reading thread cost
3.5 s of a 17.7 s conversion; on the computing thread, as one cheap reduction per tensor, it
costs 0.4 s. When a GPU computes, the host's cores are free: the check (and the copy into
pinned memory) stay on the reading thread, off the critical path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .source import Checkpoint, check_finite


def read_layer(ckpt: Checkpoint, prefix: str,
               pin: bool) -> tuple[dict[str, torch.Tensor], float]:
    """A layer's tensors as stored, and the seconds the read took; pin: checked for NaN and
    copied into pinned memory, as they go to a GPU next (the host-to-device copy is then
    asynchronous and runs at full PCIe speed); else unchecked (prefetched_layers checks them
    on the computing thread) and faulted in."""
    start = time.perf_counter()
    tensors = ckpt.layer_tensors(prefix, check=pin)
    if pin:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    else:
        fault_in(tensors)
    return tensors, time.perf_counter() - start


def fault_in(tensors: dict[str, torch.Tensor]) -> None:
    """Touch every page of these memory-mapped (contiguous, as safetensors returns them)
    tensors, so that a cold read from disk happens on this thread and not at the
    computation's first touch. numpy, not torch: see above."""
    for tensor in tensors.values():
        if tensor.numel():
            tensor.reshape(-1).view(torch.uint8).numpy()[::mmap.PAGESIZE].max()


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim; None elsewhere (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def return_freed_memory() -> None:
    """Hand the host memory freed with the last layer back to the OS. glibc keeps freed heap
    memory for reuse, and the pattern of a layer's temporaries left it growing: 0.2-0.4 GB
    over 16 layers of the bench checkpoint, so the peak rose with depth (docs/DESIGN.md,
    "Every FLOP once"). A trim takes milliseconds; faulting the next layer's temporaries in
    again costs about 2 % of a CPU conversion, for a peak 0.2 GB lower there."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def prefetched_layers(ckpt: Checkpoint, prefixes: list[str], pin: bool = False
                      ) -> Iterator[tuple[int, dict[str, torch.Tensor], float]]:
    """Yield (layer, tensors, seconds the read took) in order, layer k holding the tensors
    below prefixes[k], checked for NaN and Inf, while the next layer is read on a background
    thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hcconvert-read") as pool:
        pending: Future | None = pool.submit(read_layer, ckpt, prefixes[0], pin) if prefixes \
            else None
        for layer in range(len(prefixes)):
            return_freed_memory()  # the consumer is done with the layer before
            tensors, seconds = pending.result()
            if not pin:  # with pin, read_layer checked them
                check_finite(tensors, prefixes[layer])
            pending = (pool.submit(read_layer, ckpt, prefixes[layer + 1], pin)
                       if layer + 1 < len(prefixes) else None)
            yield layer, tensors, seconds


class BackgroundWriter:
    """Runs write jobs in submission order on one thread; at most one job waits in line.

    Errors surface at the next submit or at close, so a failed write stops the conversion.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hcconvert-write")
        self._last: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._last is not None:
            self._last.result()  # bound memory: the previous layer's writes must be done
        self._last = self._pool.submit(job)

    def then(self, job: Callable[[], None]) -> None:
        """Queue a job that holds no tensors (a layer's checkpoint) after the last, without
        waiting for it; it runs only if the last succeeded, so it never records a failed
        write as done."""
        previous = self._last

        def after_previous() -> None:
            if previous is not None:
                previous.result()  # done already (one thread, in order): re-raises its error
            job()
        self._last = self._pool.submit(after_previous)

    def close(self) -> None:
        try:
            if self._last is not None:
                self._last.result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
