"""Where a checkpoint's files are read from: a local directory (LocalFiles), or a Hub repo
(remote.RemoteFiles, remote.HubFiles), behind one protocol (CheckpointFiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..errors import UserError
from .headers import read_shard_header
from .tensors import TensorInfo

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
            path = self.root / shard
            # A shard may be a symbolic link (the HF cache links each to its blob), but no
            # folder on its way may lead out of the checkpoint.
            if not path.parent.resolve().is_relative_to(self.root.resolve()):
                raise UserError(f"shard {shard} named in the index lies outside {self.root}")
            if not path.is_file():
                raise UserError(f"shard {shard} named in the index is missing from {self.root}")
            headers.update(read_shard_header(self.root, shard))
        return headers
