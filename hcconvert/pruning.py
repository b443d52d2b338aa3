"""Pruning baselines: keep R experts and drop the rest (each survivor is a group of one)."""

from __future__ import annotations

import torch


def prune_groups(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """The `keep` highest-scoring experts (ties to the lower index), as singleton groups in
    index order. With frequencies as scores this is F-prune."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return [[e] for e in sorted(order[:keep])]
