"""Background reads and writes keep order and surface errors; the kernel path converts alike."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from checkpoints import load_all, save_tiny_mixtral

import hcconvert.methods.statistics
from hcconvert.io.source import Checkpoint
from hcconvert.io.streaming import BackgroundWriter, prefetched_layers
from hcconvert.kernels.expert_sums import expert_act_sums
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions


def test_prefetch_yields_every_layer_in_order(tmp_path):
    src = save_tiny_mixtral(tmp_path / "src", num_hidden_layers=3)
    ckpt = Checkpoint(src)
    layers = list(prefetched_layers(ckpt, [f"model.layers.{i}." for i in range(3)]))
    assert [layer for layer, _, _ in layers] == [0, 1, 2]
    for layer, tensors, seconds in layers:
        assert seconds > 0
        expected = ckpt.layer_tensors(f"model.layers.{layer}.")
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_prefetch_checks_weights_on_the_consuming_thread(tmp_path, monkeypatch):
    """The NaN check (torch ops) runs where the layers are consumed, not on the reading
    thread, whose torch ops would contend with the computation's for the cores; every layer
    is checked, under its full names."""
    import hcconvert.io.source
    import hcconvert.io.streaming

    src = save_tiny_mixtral(tmp_path / "src", num_hidden_layers=2)
    checked = []

    def recording(tensors, prefix=""):
        checked.append((threading.current_thread(), prefix, set(tensors)))
    # Wherever the check is called from: the reader's Checkpoint.read too.
    monkeypatch.setattr(hcconvert.io.streaming, "check_finite", recording)
    monkeypatch.setattr(hcconvert.io.source, "check_finite", recording)
    ckpt = Checkpoint(src)
    prefixes = [f"model.layers.{i}." for i in range(2)]
    layers = list(prefetched_layers(ckpt, prefixes))
    assert [(thread, prefix) for thread, prefix, _ in checked] == [
        (threading.main_thread(), prefix) for prefix in prefixes]
    assert [names for _, _, names in checked] == [set(tensors) for _, tensors, _ in layers]


def test_freed_host_memory_goes_back_to_the_os():
    """Heap memory freed between live allocations stays resident under glibc until trimmed:
    between layers it is returned. The pattern is made with glibc's own malloc, in a fresh
    interpreter, whose heap has no free chunks that would serve the live allocations."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "LD_PRELOAD" in os.environ:
        pytest.skip("the allocator is tuned or replaced here")
    script = """
import ctypes, os, sys
import hcconvert.io.streaming as streaming
if streaming._MALLOC_TRIM is None:
    sys.exit(3)  # not glibc
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
block = 16 * page  # below glibc's mmap threshold (128 KiB) with 4 KiB pages: on the heap

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page

blocks = [libc.malloc(block) for _ in range(400 * 2**20 // block)]
for pointer in blocks:
    ctypes.memset(pointer, 1, block)
for pointer in blocks[::2]:  # every other one: the live ones between keep them off the top
    libc.free(pointer)
before = resident()
streaming.return_freed_memory()
print(before - resident())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if result.returncode == 3:
        pytest.skip("not glibc")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100 * 2**20  # of the 200 MiB freed


def test_background_writer_keeps_order_and_runs_off_thread():
    seen = []
    with BackgroundWriter() as writer:
        for i in range(5):
            writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("hcconvert-write") for _, name in seen)


def test_background_writer_raises_the_job_error():
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), BackgroundWriter() as writer:
        writer.submit(fail)
        writer.submit(lambda: None)


def test_kernel_path_converts_like_the_torch_twin(tmp_path, calib_text, monkeypatch):
    """The converter's statistics through the Triton kernel (interpreted on CPU here, compiled
    on CUDA) give the same groups and weights as through the torch twin."""
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(method="hc-smoe",
                             experts=3, calib=str(calib_text), calib_samples=2, seq_len=32)
    convert(str(src), tmp_path / "torch", options, progress=False)
    monkeypatch.setattr(hcconvert.methods.statistics, "activation_sums", expert_act_sums)
    convert(str(src), tmp_path / "triton", options, progress=False)

    def groups(out):
        return [entry["groups"] for entry in
                json.loads((out / "hcconvert.json").read_text())["layers"]]

    assert groups(tmp_path / "torch") == groups(tmp_path / "triton")
    torch_tensors, triton_tensors = load_all(tmp_path / "torch"), load_all(tmp_path / "triton")
    for name, tensor in torch_tensors.items():
        torch.testing.assert_close(triton_tensors[name], tensor, msg=name)
