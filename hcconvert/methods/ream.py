"""REAM's grouping (Jha et al., arXiv 2604.04356, Samsung SAIL Montreal): REAP's saliency picks
the R experts that lead, and the others join them by similarity.

As the paper's code describes it: the leaders are the R experts of largest REAP saliency; from
the most salient leader down, each takes the C most similar experts not yet taken ("pseudo-
pruning": the merge is dominated by the leader, and most of what the router relied on stays
intact). Similarity is the mean of two cosine similarities, of the experts' outputs and of
their router-logit columns. Members are then neuron-aligned to the leader and merged
(--merge msmoe), and each layer is calibrated on the already reduced layers before it
(--propagate merged). How this differs: the output similarity uses hcconvert's mean expert
outputs over all tokens rather than gate-weighted outputs, and C = ceil((E − R) / R), so at
the small expert counts we measure every leader takes members.
E experts, R leaders, D feature width.
"""

from __future__ import annotations

import math

import torch


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarities of the rows of features [E, D]."""
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    return unit @ unit.T


def ream_groups(saliency: torch.Tensor, output_features: torch.Tensor,
                logit_features: torch.Tensor, keep: int) -> list[list[int]]:
    """keep groups of expert indices (sorted, ordered by smallest member): leaders by saliency
    [E], members by the mean cosine similarity of output [E, D] and logit [E, S] features."""
    count = len(saliency)
    similarity = (cosine_matrix(output_features) + cosine_matrix(logit_features)) / 2
    leaders = sorted(range(count), key=lambda e: (-float(saliency[e]), e))[:keep]
    free = [e for e in range(count) if e not in leaders]
    per_leader = math.ceil(len(free) / keep) if keep else 0
    groups = []
    for leader in leaders:  # the most salient leader chooses first
        nearest = sorted(free, key=lambda e: (-float(similarity[leader, e]), e))[:per_leader]
        free = [e for e in free if e not in nearest]
        groups.append(sorted([leader, *nearest]))
    return sorted(groups)
