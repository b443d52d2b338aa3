"""Merging each group of experts into one expert: a weighted average of their weights.

E experts, R groups, F expert ffn, H hidden. Arithmetic in fp32, results cast back to the
source dtype.
"""

from __future__ import annotations

import torch

from .modeling import Experts


def member_weights(group: list[int], counts: torch.Tensor, merge: str) -> torch.Tensor:
    """Averaging weights of a group's members: by router frequency ("freq") or uniform.

    A group whose members the router never picked falls back to the plain average.
    """
    freq = counts[group].double()
    if merge == "average" or freq.sum() == 0:
        return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
    if merge != "freq":
        raise ValueError(f"unknown merge {merge!r}")
    return freq / freq.sum()


def weighted_sum(stacked: torch.Tensor, group: list[int], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights[i] · stacked[group[i]] in fp32, cast back to stacked's dtype."""
    members = stacked[group].float()  # [G, ...]
    scale = weights.float().to(members.device).view(-1, *([1] * (members.dim() - 1)))
    return (members * scale).sum(0).to(stacked.dtype)


def merge_experts(experts: Experts, groups: list[list[int]], counts: torch.Tensor,
                  merge: str = "freq") -> Experts:
    """One merged expert per group, in group order. Returns gate, up [R, F, H]; down [R, H, F]."""
    merged = {"gate": [], "up": [], "down": []}
    for group in groups:
        weights = member_weights(group, counts, merge)
        for name, parts in merged.items():
            parts.append(weighted_sum(getattr(experts, name), group, weights))
    return Experts(*(torch.stack(merged[name]) for name in ("gate", "up", "down")))
