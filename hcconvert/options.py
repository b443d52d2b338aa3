"""Every conversion option in one frozen object; the CLI and the Python API both build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METHODS = ("merge", "prune")
ROUTERS = ("dominant", "freq-avg", "lse-fit")
MERGES = ("freq", "average")
PROPAGATIONS = ("original", "merged")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ConvertOptions:
    experts: int
    method: str = "merge"
    grouping: str = "hierarchical"
    linkage: str = "average"
    merge: str = "freq"
    router: str = "lse-fit"
    propagate: str = "original"
    calib: str | None = None
    calib_samples: int = 32
    seq_len: int = 2048
    seed: int = 42
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    revision: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
