"""The reduced router: one row per merged expert.

- dominant: the row of the group's most frequently picked member.
- leader:   the row of the group's leader, REAM's most salient member (REAM lists it first;
            the official code keeps the leader's row and correction bias).
- freq-avg: the frequency-weighted average of the members' rows.
- lse-fit:  ridge least squares on calibration inputs so that x·w_c ≈ log Σ_{i∈c} exp(x·w_i),
            i.e. the merged expert's softmax mass matches its members' combined mass.
            The ridge pulls towards the freq-avg row, so directions calibration never saw
            keep a sensible row instead of collapsing to zero.
Singleton groups always keep their original row (so pruning keeps the survivors' rows).
"""

from __future__ import annotations

import torch

from .lstsq import ridge_solve
from .merging import dominant, member_weights, weighted_sum

ROUTERS = ("dominant", "freq-avg", "lse-fit", "leader")


def reduce_router(router: torch.Tensor, groups: list[list[int]], counts: torch.Tensor,
                  method: str, gram: torch.Tensor | None = None,
                  cross: torch.Tensor | None = None) -> torch.Tensor:
    """[R, H] router rows for the groups. lse-fit needs XᵀX (gram) and Xᵀy (cross)."""
    if method not in ROUTERS:
        raise ValueError(f"unknown router {method!r}; choose from {', '.join(ROUTERS)}")
    if method in ("dominant", "leader") or all(len(g) == 1 for g in groups):
        return router[representatives(groups, counts, method)].clone()
    rows = torch.stack([weighted_sum(router, g, member_weights(g, counts, "freq"))
                        for g in groups])
    if method == "lse-fit":
        rows = _lse_fit(router, rows, groups, gram, cross)
    return rows


def _lse_fit(router, prior, groups, gram, cross) -> torch.Tensor:
    if gram is None or cross is None:
        raise ValueError("lse-fit needs the calibration Gram matrices")
    fitted = ridge_solve(gram, cross, prior.T)  # [H, R]
    rows = fitted.T.to(router.dtype).to(router.device)
    for c, group in enumerate(groups):
        if len(group) == 1:
            rows[c] = router[group[0]]
    return rows


def representatives(groups: list[list[int]], counts: torch.Tensor, method: str) -> list[int]:
    """The member whose row and bias stand for each group: the leader (listed first) with the
    leader router, else the dominant member."""
    if method == "leader":
        return [group[0] for group in groups]
    return [dominant(group, counts) for group in groups]


def reduce_router_bias(bias: torch.Tensor, groups: list[list[int]], counts: torch.Tensor,
                       method: str = "freq-avg") -> torch.Tensor:
    """A per-expert router bias ([E], or [1, E] as Ernie stores it) for the groups: each
    group's dominant member's entry (it kept the most quality in docs/DESIGN.md's measurement,
    ahead of the frequency-weighted mean, the largest entry and zero), or with the leader
    router its leader's. Singletons keep theirs."""
    flat = bias.reshape(-1, bias.shape[-1]).T  # [E, rows]
    reduced = flat[representatives(groups, counts, method)]
    return reduced.T.reshape(*bias.shape[:-1], len(groups)).contiguous()
