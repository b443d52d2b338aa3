"""Writing the reduced checkpoint: streamed safetensors shards, index, config, card, metadata.

The full list of output tensors (name, dtype, shape) is known before any weight is read, so each
shard's header is written first and tensors are appended as the pipeline produces them: the
writer holds one tensor at a time, never a whole shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import UserError
from .durable import kill_point, sync_directory
from .tensors import SAFETENSORS_DTYPES, OutputTensor


def assign_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most max_shard_size bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes tensors in plan order into pre-headed shards; writes the index on close.

    Use as a context manager; `write` must be called once per planned tensor, in plan order.
    Given a position (tensors already written by an interrupted run), it goes on from there:
    the open shard is cut back to that tensor's offset and any later shard is removed.
    Every shard is synced to disk when it is closed, so a published output survives a crash.
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], max_shard_size: int,
                 position: int = 0):
        self.directory = directory
        self.shards = assign_shards(tensors, max_shard_size)
        self._queue = [(k, t) for k, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._file = None
        self._open_shard = -1
        if position:
            self._resume_at(position)

    @property
    def position(self) -> int:
        """How many tensors are written."""
        return self._position

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._close_shard()
        if exc_type is None:
            if self._position != len(self._queue):
                missing = self._queue[self._position][1].name
                raise RuntimeError(f"writer closed before tensor {missing} was written")
            self._write_index()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, planned = self._queue[self._position]
        dtype = SAFETENSORS_DTYPES.get(tensor.dtype)
        if name != planned.name or tuple(tensor.shape) != planned.shape or dtype != planned.dtype:
            raise RuntimeError(f"tensor {name} {dtype}{list(tensor.shape)} does not match the "
                               f"plan's {planned.name} {planned.dtype}{list(planned.shape)}")
        if shard != self._open_shard:
            self._start_shard(shard)
        data = tensor.detach().to("cpu").contiguous().view(-1)
        self._file.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        self._position += 1
        kill_point(f"tensor:{self._position}")

    def sync(self) -> None:
        """Everything written so far on disk (before a checkpoint records the position)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        sync_directory(self.directory)

    def _shard_path(self, k: int) -> Path:
        return self.directory / shard_name(k + 1, len(self.shards))

    def _shard_header(self, k: int) -> bytes:
        header, offset = {}, 0
        for t in self.shards[k]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
        return struct.pack("<Q", len(encoded)) + encoded

    def _start_shard(self, k: int) -> None:
        if self._file is not None:
            self._close_shard()
        self._file = open(self._shard_path(k), "wb")
        self._file.write(self._shard_header(k))
        self._open_shard = k

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _resume_at(self, position: int) -> None:
        """Go on after `position` tensors: reopen their shard cut back to where the next
        tensor starts (bytes past it are from after the checkpoint), drop later shards."""
        if not 0 < position <= len(self._queue):
            raise UserError(f"cannot resume in {self.directory}: position {position} is not in "
                            "the plan; pass --no-resume to start over")
        shard, _ = self._queue[position - 1]
        before = sum(1 for k, _ in self._queue[:position] if k == shard)
        end = len(self._shard_header(shard)) + sum(t.nbytes for t in self.shards[shard][:before])
        path = self._shard_path(shard)
        if not path.is_file() or path.stat().st_size < end:
            raise UserError(f"cannot resume: {path} is shorter than its checkpoint says; pass "
                            "--no-resume to start over")
        for later in range(shard + 1, len(self.shards)):
            self._shard_path(later).unlink(missing_ok=True)
        self._file = open(path, "r+b")
        self._file.truncate(end)
        self._file.seek(end)
        self._open_shard, self._position = shard, position

    def _write_index(self) -> None:
        n = len(self.shards)
        weight_map = {t.name: shard_name(k + 1, n) for k, s in enumerate(self.shards) for t in s}
        total = sum(t.nbytes for s in self.shards for t in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(self.directory / "model.safetensors.index.json", index)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


