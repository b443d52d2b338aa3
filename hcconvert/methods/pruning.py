"""Pruning baselines: keep R experts and drop the rest (each survivor is a group of one, so it
keeps its weights and its router row).

- frequency (F-prune): keep the experts the router picks most often.
- output (O-prune, REAP's criterion): keep the experts whose routed contribution is largest,
  the mean over the tokens routed to an expert of routing weight x output norm
  (statistics.routed_saliency).
"""

from __future__ import annotations

import torch

from .statistics import LayerStats

# Keep the experts the router picks most often (F-prune) or with the largest routed output
# (O-prune, REAP's saliency).
PRUNE_BY = ("frequency", "output")


def prune_scores(stats: LayerStats, prune_by: str) -> torch.Tensor:
    """[E] the score each expert is kept by."""
    if prune_by == "frequency":
        return stats.counts
    if prune_by == "output":
        if stats.saliency is None:
            raise ValueError("O-prune needs the routed saliency statistics")
        return stats.saliency
    raise ValueError(f"unknown prune criterion {prune_by!r}")


def prune_groups(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """The `keep` highest-scoring experts (ties to the lower index), as singleton groups in
    index order. With frequencies as scores this is F-prune."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return [[e] for e in sorted(order[:keep])]
