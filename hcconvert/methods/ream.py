"""REAM's grouping (Jha et al., arXiv 2604.04356; the official code, SamsungSAILMontreal/ream,
`ream/ream.py`, `ream/saliency.py`, `ream/moe_utils.py`, `ream/merger.py`): R leaders by
saliency, each filling a group with the experts most similar to it.

As the official code does it (`--method ream`):
- statistics over every calibration token (`run_all_experts` with `gated_sim`): router
  probabilities p = softmax of the raw router logits x·Wᵀ over all experts (whatever the
  family's own scoring); each expert's mean output weighted by its probability,
  mean_t p_t,e · expert_e(x_t); and the Gram matrix of the router-logit columns;
- saliency: REAP's, from those probabilities: over the tokens whose top-k (by p) holds e, the
  mean of p_t,e · ‖p_t,e · expert_e(x_t)‖ (the code hands `reap()` the outputs already scaled
  by p, so p enters twice); an expert with saliency 0 gets min(0.5, the least non-zero
  saliency), so the never-picked experts can still be merged;
- similarity: the mean of (cos + 1) / 2 of the weighted mean outputs and 1 − d / max d, d the
  distances between the unit-normalised router-logit columns; distance = 1 − similarity;
- grouping ("pseudo-pruning"): the R most salient experts lead; from the most salient leader
  down, each takes the experts nearest to it not yet taken until its group holds C experts
  (C = 16 counting the leader, --max-group-size), and the filling stops once every expert is
  taken. At 128 -> 96 most leaders stay alone; at 8 -> 4, one group of 5 and 3 alone.
The merge (ream_alignment.py), the leader's router row and bias and the sequential calibration
(--propagate merged) are set by the recipe. How this differs from the official code: it
averages per-batch means of 8 sequences where we average over all tokens, and a layer under
group-limited routing is grouped routing group by routing group.

hcconvert's variant (`--method ream-balanced`, kept as `--saliency routed --similarity cosine`):
saliency from the model's own routing (REAP's corrected definition, O-prune's), similarity the
mean of two raw cosines (unweighted mean outputs; router-logit columns on sampled tokens), and
groups of C = ceil(E / R), so at the small expert counts we measure every leader takes
members. T tokens, E experts, F expert ffn, H hidden, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.experts import Experts

# --saliency: the official code's (router probabilities of the raw logits), or REAP's from the
# model's own routing.
SALIENCIES = ("ream", "routed")
# --similarity: the official code's, or hcconvert's mean of two cosines.
SIMILARITIES = ("ream", "cosine")
# The official code's floor for an expert no token picked: min(this, least non-zero saliency).
SALIENCY_FLOOR = 0.5
# normalize_rows' and F.cosine_similarity's guard against zero norms in the official code.
NORM_EPS = 1e-8
# Tokens per chunk of the statistics pass: bounds its [t, F] activations.
CHUNK_TOKENS = 4096


@dataclass
class ReamStats:
    """The official code's statistics of one MoE layer."""

    gated_output_mean: torch.Tensor  # [E, H] mean over all tokens of p_t,e · expert_e(x_t)
    logit_gram: torch.Tensor  # [E, E] fp64 Σ_t l_t l_tᵀ of the raw router logits l_t [E]
    saliency: torch.Tensor  # [E] the official REAP saliency, before the zero floor


def ream_statistics(x: torch.Tensor, router: torch.Tensor, experts: Experts,
                    top_k: int) -> ReamStats:
    """ReamStats over the layer's inputs x [T, H], router weight [E, H]: one pass of every
    expert over every token, a chunk of experts on the device at a time."""
    count, ffn = experts.up.shape[:2]
    tokens = x.shape[0]
    means = torch.zeros(count, experts.down.shape[1], device=x.device)
    probability_sums = torch.zeros(count, dtype=torch.float64, device=x.device)
    saliency_sums = torch.zeros(count, dtype=torch.float64, device=x.device)
    routed = torch.zeros(count, dtype=torch.float64, device=x.device)
    gram = torch.zeros(count, count, dtype=torch.float64, device=x.device)
    for start in range(0, tokens, CHUNK_TOKENS):
        logits = x[start:start + CHUNK_TOKENS].float() @ router.float().T  # [t, E]
        gram += (logits.T @ logits).double()
        probability_sums += torch.softmax(logits, -1).sum(0).double()
    for chunk, places in experts.chunks():
        gated_sums = torch.zeros(len(places), ffn, device=x.device)  # Σ_t p_t,e hidden_e(x_t)
        for start in range(0, tokens, CHUNK_TOKENS):
            part = x[start:start + CHUNK_TOKENS]
            probabilities = torch.softmax(part.float() @ router.float().T, -1)  # [t, E]
            top_p, top_e = probabilities.topk(top_k, dim=-1)
            for i, (e, at) in enumerate(places):
                hidden = chunk.hidden(part, at)  # [t, F]
                gated_sums[i] += probabilities[:, e] @ hidden.float()
                token, slot = torch.where(top_e == e)
                if token.numel():
                    out = chunk.down_projection(hidden[token], at).float()
                    p = top_p[token, slot]
                    saliency_sums[e] += (p * (p * out.norm(dim=-1))).sum().double()
                    routed[e] += token.numel()
        for i, (e, at) in enumerate(places):
            means[e] = chunk.down[at].float() @ (gated_sums[i] / tokens)
    if experts.down_bias is not None:  # Σ_t p_t,e (W h + b) / T
        means += (probability_sums / tokens).float()[:, None] * experts.down_bias.to(x.device)
    return ReamStats(means.cpu(), gram.cpu(), (saliency_sums / routed.clamp_min(1)).float().cpu())


def floored(saliency: torch.Tensor) -> torch.Tensor:
    """The official code's saliency with its zero floor (all zeros stay zeros)."""
    found = saliency.clone()
    zero = found == 0
    if zero.any() and not zero.all():
        found[zero] = min(SALIENCY_FLOOR, found[~zero].min().item())
    return found


def official_distance(stats: ReamStats) -> np.ndarray:
    """[E, E] float32 1 − the official similarity of the experts."""
    output = (_cosines(stats.gated_output_mean.double()) + 1) / 2
    gram = stats.logit_gram.double()
    scale = gram.diagonal().sqrt() + NORM_EPS  # ‖l_e‖ + eps: normalize_rows' divisor
    unit_gram = gram / scale[:, None] / scale[None, :]
    squared = unit_gram.diagonal()[:, None] + unit_gram.diagonal()[None, :] - 2 * unit_gram
    logit_distance = squared.clamp_min(0).sqrt()
    largest = logit_distance.max()
    logit = 1 - logit_distance / largest if largest > 0 else torch.ones_like(logit_distance)
    return _distance((output + logit) / 2)


def cosine_distance(output_features: torch.Tensor, logit_features: torch.Tensor) -> np.ndarray:
    """[E, E] float32 1 − the mean cosine similarity of the experts' output [E, D] and logit
    [E, S] features (hcconvert's variant)."""
    return _distance((_cosines(output_features.double())
                      + _cosines(logit_features.double())) / 2)


def _cosines(features: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarities of the rows of features, each norm at least NORM_EPS."""
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return unit @ unit.T


def _distance(similarity: torch.Tensor) -> np.ndarray:
    distance = (1 - similarity).float().numpy()
    np.fill_diagonal(distance, 0)  # the official matrix fills only pairs of distinct experts
    return distance


def pseudo_groups(saliency: torch.Tensor, distance: np.ndarray, keep: int,
                  group_size: int) -> list[list[int]]:
    """keep groups, each its leader first and then its members ascending, ordered by leader:
    the most salient experts lead (ties as the official code's argsort breaks them), and
    each in turn takes the nearest experts not yet taken, up to group_size in all, until
    every expert is taken. group_size * keep must reach the expert count."""
    count = len(saliency)
    if keep * group_size < count:
        raise ValueError(f"{keep} groups of {group_size} cannot hold {count} experts")
    leaders = np.argsort(saliency.float().numpy())[::-1][:keep]
    label = np.full(count, -1)
    label[leaders] = np.arange(keep)
    for leader in leaders:
        group = [leader]
        for expert in np.argsort(distance[leader]):
            if expert != leader and label[expert] == -1:
                group.append(expert)
            if len(group) >= group_size:
                break
        label[group] = label[leader]
        if (label >= 0).all():
            break
    return sorted(([int(leader)] + [int(e) for e in np.flatnonzero(label == label[leader])
                                    if e != leader] for leader in leaders),
                  key=lambda group: group[0])
