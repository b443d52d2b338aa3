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
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError, first_line
from .files import HUB_SIDE_FILES, INDEX_FILE, SINGLE_FILE, CheckpointFiles, LocalFiles
from .headers import json_type, parse_index
from .tensors import TensorInfo


def is_hub_id(src: str) -> bool:
    """owner/name that is no local path."""
    return (not Path(src).exists() and not src.startswith((".", "/", "~"))
            and src.count("/") == 1)


def check_hub_id(src: str) -> None:
    """Refuse a SRC that is no directory and cannot be a Hub repo id, or that names a missing
    directory inside an existing one (models/mixtral where models/ exists is a typo, not a
    Hub repo)."""
    if Path(src).exists():
        raise UserError(f"source {src} is a file, not a checkpoint directory or Hub repo id")
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
        if not isinstance(config, dict):
            raise UserError(f"config.json holds a JSON {json_type(config)}, not an object")
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


