"""A safetensors index and shard headers, checked entry by entry before any tensor is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path, PurePosixPath

from ..errors import UserError, first_line
from .tensors import DTYPE_BYTES, TensorInfo

# safetensors refuses headers above 100 MB: so do we, before reading one into memory.
MAX_HEADER_BYTES = 100_000_000


def parse_index(text: str, where: str | Path) -> dict[str, str]:
    """The weight map (tensor name -> shard) of a safetensors index's text: names and shards
    are strings, and every shard a path inside the checkpoint (check_shard_name)."""
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(f"{where} is not a valid safetensors index ({first_line(err)})") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{where} is not a valid safetensors index (weight_map is not a map)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise UserError(f"{where}: tensor {name[:200]} maps to a JSON {json_type(shard)}, "
                            "not a shard file name")
        check_shard_name(shard, where)
    return weight_map


def check_shard_name(shard: str, where: str | Path) -> None:
    """A shard named by an index must be a relative path below the checkpoint (a subfolder is
    fine), so no index, local or on the Hub, makes hcconvert open a file outside it."""
    parts = PurePosixPath(shard).parts
    if (not shard or "\\" in shard or "\0" in shard or shard.startswith("/") or not parts
            or ".." in parts or shard.startswith("~")):
        raise UserError(f"{where} names shard {shard[:200]!r}: not a file inside the checkpoint")


def read_shard_header(root: Path, shard: str) -> dict[str, TensorInfo]:
    """Parse the header of shard (its path below root, as the index names it: it may be in a
    subfolder) and check it the way safetensors will when the shard is opened: every entry a
    known dtype, a shape of non-negative integers and offsets holding exactly its bytes, the
    tensors packed end to end, and the file exactly that long."""
    path = root / shard
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, RecursionError, struct.error) as err:
        raise UserError(f"shard {shard} is unreadable or truncated "
                        f"({first_line(err)})") from None
    return header_tensors(shard, header, header_len, size)


def header_tensors(shard: str, header: object, header_len: int,
                   size: int | None) -> dict[str, TensorInfo]:
    """The tensors of a parsed safetensors header, checked entry by entry; size (the file's
    bytes, None when unknown) must be exactly what the header promises."""
    if not isinstance(header, dict):
        raise UserError(f"shard {shard}: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise UserError(f"shard {shard}: __metadata__ is not a JSON object")
    tensors = {name: _tensor_entry(shard, name, entry) for name, entry in header.items()}
    data_end = _check_packed(shard, {name: header[name]["data_offsets"] for name in tensors})
    if size is not None and 8 + header_len + data_end != size:
        problem = "truncated" if 8 + header_len + data_end > size else "longer than its header says"
        raise UserError(f"shard {shard} is {problem}: {size} bytes, header promises "
                        f"{8 + header_len + data_end}")
    return tensors


def _tensor_entry(shard: str, name: str, entry: object) -> TensorInfo:
    """One header entry, checked: dtype, shape and offsets that agree with each other."""
    where = f"tensor {name[:200]} in {shard}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise UserError(f"{where} has dtype {dtype!r}, which hcconvert does not handle")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise UserError(f"{where}: shape {str(shape)[:60]} is not a list of non-negative "
                        "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets {str(offsets)[:60]} is not a [begin, end] "
                        "pair of byte positions")
    info = TensorInfo(shard, dtype, tuple(shape))
    if offsets[1] - offsets[0] != info.nbytes:
        raise UserError(f"{where}: {dtype}{shape} needs {info.nbytes} bytes, its offsets hold "
                        f"{offsets[1] - offsets[0]}")
    return info


def _check_packed(shard: str, offsets: dict[str, list[int]]) -> int:
    """Tensors must tile the data section from byte 0 without gaps or overlaps (safetensors
    refuses the file otherwise); return where the data ends."""
    end = 0
    for name, (begin, stop) in sorted(offsets.items(), key=lambda item: tuple(item[1])):
        if begin != end:
            fault = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise UserError(f"tensor {name} in {shard}: data_offsets [{begin}, {stop}] {fault}")
        end = stop
    return end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
