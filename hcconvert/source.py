"""Reading a checkpoint: resolve SRC, read config and shard index, open tensors lazily.

Nothing here loads more than the tensor asked for: shards are memory-mapped by
`safetensors.safe_open`, and the headers alone answer names, shapes and dtypes. A Checkpoint
reads its config, index and headers through CheckpointFiles: a local directory (LocalFiles) or
a Hub repo read over HTTP without its weights (remote.RemoteFiles), so planning and `inspect`
work the same on both.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from .config_checks import check_config
from .errors import UserError, first_line

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied beside the weights into the output as they are: tokenizer, chat template,
# generation settings (and the repo's top-level *.py, its remote code, copied, never run:
# writer.copy_side_files). Never pickles.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "tiktoken.model", "vocab.json", "merges.txt",
              "generation_config.json", "chat_template.jinja", "chat_template.json")
# What a conversion needs from a Hub repo besides the shards (README.md: the model card's
# license).
HUB_SIDE_FILES = ["config.json", *SIDE_FILES, INDEX_FILE, "README.md",
                  "*.py"]  # the repo's remote code, copied unrun (writer.copy_side_files)
# safetensors refuses headers above 100 MB: so do we, before reading one into memory.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with this safetensors dtype code and shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place and shape, read from its shard's header."""

    shard: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def is_hub_id(src: str) -> bool:
    """owner/name that is no local path."""
    return (not Path(src).exists() and not src.startswith((".", "/", "~"))
            and src.count("/") == 1)


def check_hub_id(src: str) -> None:
    """Refuse a SRC that is no directory and cannot be a Hub repo id, or that names a missing
    directory inside an existing one (models/mixtral where models/ exists is a typo, not a
    Hub repo)."""
    parent = Path(src).parent
    if parent != Path(".") and parent.is_dir():
        raise UserError(f"source {src}: no such directory")
    if not is_hub_id(src):
        raise UserError(f"source {src}: no such directory, and not a Hub repo id (owner/name)")


def check_low_disk(src: str) -> None:
    """--low-disk deletes downloaded shards: a local directory is never touched."""
    if Path(src).is_dir():
        raise UserError(f"--low-disk deletes a Hub source's shards once read; {src} is a "
                        "local directory, which hcconvert never modifies")


def open_checkpoint(src: str, revision: str | None = None,
                    low_disk: bool = False) -> Checkpoint:
    """SRC to read weights from: a local directory as is; a Hub repo with its small files
    downloaded now and each shard when a tensor in it is first read (remote.HubFiles; with
    low_disk deleted again once all its tensors are read); offline, a Hub repo's snapshot in
    the HF cache."""
    if low_disk:
        check_low_disk(src)
    if Path(src).is_dir():
        return Checkpoint(Path(src))
    check_hub_id(src)
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return Checkpoint(_download(src, revision))
    from .remote import HubFiles

    return Checkpoint(HubFiles.download_side_files(src, revision, low_disk))


def open_headers(src: str, revision: str | None = None) -> Checkpoint:
    """SRC's config and tensor headers without its weights: a local directory as is, a Hub repo
    read by HTTP range requests (from the HF cache when offline)."""
    from huggingface_hub import constants

    if Path(src).is_dir():
        return Checkpoint(Path(src))
    check_hub_id(src)
    if constants.is_offline_mode():
        return Checkpoint(_download(src, revision))
    from .hub import hub_errors
    from .remote import RemoteFiles

    with hub_errors(f"cannot read {src!r} from the Hub"):
        return Checkpoint(RemoteFiles(src, revision))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    from .hub import hub_errors

    with hub_errors(f"cannot download {repo_id!r}"):
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_SIDE_FILES))
        # Only the shards the index names: some repos also carry other-format weights.
        shards = _indexed_shards(root)
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=HUB_SIDE_FILES + shards))


def _indexed_shards(root: Path) -> list[str]:
    if not (root / INDEX_FILE).is_file():
        return [SINGLE_FILE]
    return sorted(set(parse_index((root / INDEX_FILE).read_text(), root / INDEX_FILE).values()))


def parse_index(text: str, where: str | Path) -> dict[str, str]:
    """The weight map (tensor name -> shard) of a safetensors index's text."""
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{where} is not a valid safetensors index ({err})") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{where} is not a valid safetensors index (weight_map is not a map)")
    return weight_map


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


_SUMMED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def check_finite(tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Refuse NaN or Inf in a weight as it is read, naming it (prefix + its key): otherwise it
    spreads through the calibration states and fails, or is published, far from its cause."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        # A sum is NaN or infinite where any value is. Where the sum has fp32's range it
        # overflows only for values near it, which no weight holds: one pass, 1.8x faster
        # than the extremes on bf16 here; the extremes decide only when it is not finite.
        if tensor.dtype in _SUMMED_DTYPES and bool(torch.isfinite(tensor.sum())):
            continue
        if tensor.element_size() == 1:  # torch has no aminmax for float8; float16 holds it
            tensor = tensor.to(torch.float16)
        # The extremes are NaN where any value is and infinite where any is: one reduction,
        # about 20x faster than isfinite(...).all() on bf16 here.
        if not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            raise UserError(f"tensor {prefix}{name} holds NaN or infinite values")


class CheckpointFiles(Protocol):
    """Where a Checkpoint reads its config, index and shard headers."""

    root: Path | None  # the local directory holding the shards; None for a remote repo
    location: str  # for messages

    def read_text(self, name: str) -> str | None:
        """A small file's text; None when it does not exist."""

    def exists(self, name: str) -> bool: ...

    def shard_headers(self, shards: list[str]) -> dict[str, TensorInfo]:
        """Every tensor of these shards, from their headers; a missing shard is a UserError."""

    def track(self, tensors: dict[str, TensorInfo]) -> None:
        """The checkpoint's tensors, as its index names them."""


class LocalFiles:
    """A checkpoint directory."""

    peak_bytes: int | None = None  # of downloaded shards held at once (remote.HubFiles)

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def local_shard(self, shard: str) -> Path:
        """Where to read the shard's tensors (remote.HubFiles downloads it first)."""
        return self.root / shard

    def track(self, tensors: dict[str, TensorInfo]) -> None:
        """The checkpoint's tensors, as its index names them (remote.HubFiles counts them)."""

    def release(self, names: list[str]) -> None:
        """The run needs these tensors no more (remote.HubFiles may delete their shards)."""

    def shard_headers(self, shards: list[str]) -> dict[str, TensorInfo]:
        headers: dict[str, TensorInfo] = {}
        for shard in shards:
            if not (self.root / shard).is_file():
                raise UserError(f"shard {shard} named in the index is missing from {self.root}")
            headers.update(read_shard_header(self.root, shard))
        return headers


class Checkpoint:
    """A Hugging Face checkpoint: config, tensor index, lazy tensor access (through files
    that have local shards: LocalFiles, remote.HubFiles)."""

    def __init__(self, source: Path | str | CheckpointFiles):
        self.files = (LocalFiles(Path(source)) if isinstance(source, str | os.PathLike)
                      else source)
        self.root = self.files.root
        self.location = self.files.location
        self.config = self._read_config()
        self.tensors = self._read_index()
        self.files.track(self.tensors)

    def _read_config(self) -> dict:
        text = self.files.read_text("config.json")
        if text is None:
            raise UserError(f"{self.location} has no config.json")
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise UserError(f"{self.location}/config.json is not valid JSON: "
                            f"{first_line(err)}") from None
        check_config(config)
        return config

    def _read_index(self) -> dict[str, TensorInfo]:
        index = self.files.read_text(INDEX_FILE)
        if index is not None:
            weight_map = parse_index(index, f"{self.location}/{INDEX_FILE}")
            shards = sorted(set(weight_map.values()))
        elif self.files.exists(SINGLE_FILE):
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise UserError(f"{self.location} has no {INDEX_FILE} or {SINGLE_FILE}")
        headers = self.files.shard_headers(shards)
        if weight_map is None:
            return headers
        for name, shard in weight_map.items():
            if name not in headers or headers[name].shard != shard:
                raise UserError(f"tensor {name} is in the index but not in shard {shard}")
        return {name: headers[name] for name in weight_map}

    def read(self, names: list[str], check: bool = True) -> dict[str, torch.Tensor]:
        """Read tensors (views of the memory-mapped shards), opening each shard once, and
        release them (with --low-disk a second read downloads their shard again); check:
        refuse NaN and Inf here (check_finite), else the caller must.

        The handles close again before returning, so a map lasts only as long as the views
        of it: pages of a map stay counted in the resident set while it is open, so a cached
        handle would grow RSS with every layer read.
        """
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.tensors[name].shard, []).append(name)
        tensors = {}
        for shard, members in by_shard.items():
            with safe_open(str(self.files.local_shard(shard)), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in members})
            self.files.release(members)
        if check:
            check_finite(tensors)
        return tensors

    def release(self, names: list[str]) -> None:
        """Tensors the run will not read (a resumed run's finished layers): with --low-disk
        their shards may go."""
        self.files.release(names)

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def layer_tensors(self, prefix: str, check: bool = True) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors as stored, keyed by their name below the layer's prefix
        (`model.layers.7.`); check as in read."""
        names = [n for n in self.tensors if n.startswith(prefix)]
        return {n.removeprefix(prefix): t for n, t in self.read(names, check).items()}

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

