"""Writing the reduced checkpoint: streamed safetensors shards, index, config, card, metadata.

The full list of output tensors (name, dtype, shape) is known before any weight is read, so each
shard's header is written first and tensors are appended as the pipeline produces them: the
writer holds one tensor at a time, never a whole shard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .source import SIDE_FILES, tensor_nbytes

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


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
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], max_shard_size: int):
        self.directory = directory
        self.shards = assign_shards(tensors, max_shard_size)
        self._queue = [(k, t) for k, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._file = None
        self._open_shard = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
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

    def _start_shard(self, k: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {}, 0
        for t in self.shards[k]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
        self._file = open(self.directory / shard_name(k + 1, len(self.shards)), "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_shard = k

    def _write_index(self) -> None:
        n = len(self.shards)
        weight_map = {t.name: shard_name(k + 1, n) for k, s in enumerate(self.shards) for t in s}
        total = sum(t.nbytes for s in self.shards for t in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(self.directory / "model.safetensors.index.json", index)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_output_dir(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse an --out that is SRC, inside it or holding it, or the working directory or one
    above it (--overwrite replaces --out whole), or one that holds files (unless --overwrite)."""
    out_abs, src_abs, cwd = out.resolve(), src.resolve(), Path.cwd().resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise UserError(f"--out {out} is the source directory or inside it")
    if out_abs in src_abs.parents:
        raise UserError(f"--out {out} contains the source directory")
    if out_abs == cwd or out_abs in cwd.parents:
        raise UserError(f"--out {out} is the working directory or holds it; name a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty (pass --overwrite to replace it)")


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory beside --out; the output only appears on success."""
    staging = out.parent / f".{out.name}.hcconvert-tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory into place. An old --out is moved aside first and
    deleted only once the new one is in place, so a crash never leaves neither."""
    if not out.exists():
        os.replace(staging, out)
        return
    previous = out.parent / f".{out.name}.hcconvert-old"
    if previous.exists():
        shutil.rmtree(previous)
    os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous)


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
