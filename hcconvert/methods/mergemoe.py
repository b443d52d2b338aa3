"""MergeMoE-style merging: fit the merged expert to its members' combined output.

MergeMoE (Miao et al., arXiv 2510.14436) views merging N experts into M as inserting matrices
into the MoE forward: the layer output Y·mask(softmax(W_r X))ᵀ, Y = [E_1(X) … E_N(X)], becomes
Y·B·A·mask(…)ᵀ, A [M, N] summing each cluster's routing scores and B [N, M] holding each
member's weight in its cluster. The merged expert must then approximate the weighted sum of
its members' outputs, E'_c(x) ≈ Σ_{i∈c} B_ic E_i(x), and the paper obtains the merged weights
by least squares on sampled calibration inputs instead of by averaging parameters.

What we implement, per group c with members i, frequency weights p_i (B's entries):
  1. gate and up: M-SMoE's (neurons aligned to the dominant member, then frequency-weighted
     averages) in the compute dtype, so a_t = silu(gate·x_t)·(up·x_t) [F] is what the merged
     expert computes;
  2. down: argmin_W Σ_t ||W a_t − Σ_i p_i down_i a_{i,t}||² + λ||W − W_0||², W_0 the
     frequency-averaged aligned down, over the tokens routed to any member; in closed form
     Wᵀ = (AᵀA + λI)⁻¹ (AᵀY + λW_0ᵀ), with AᵀA [F, F] and AᵀY [F, H] accumulated over token
     chunks in fp32 and solved by Cholesky (lstsq.py), λ = RIDGE × mean diag(AᵀA).
With expert biases (GPT-OSS) the merged down bias is the members' p-weighted mean, which
supplies Σ_i p_i b_i exactly, so the fit leaves the biases out of W's target.
How this differs from the paper: only the down projection is fitted (the paper also derives the
gate/up side from its optimisation rather than taking an aligned average), the targets use
fixed frequency weights p_i rather than per-token routing scores, the ridge towards W_0 is ours
(it keeps directions calibration never excites sensible), and tokens are those the original
router sent to the group rather than a separate sample.
F expert ffn, H hidden, G members, t tokens in a chunk.
"""

from __future__ import annotations

import torch

from ..model.experts import Experts
from .alignment import NeuronMatcher
from .lstsq import ridge_solve


def least_squares_down(matcher: NeuronMatcher, experts: Experts, group: list[int],
                       weights: torch.Tensor, merged: Experts) -> torch.Tensor:
    """[H, F] fp32 down projection for the one merged expert's gate and up, pulled towards
    its down; weights [G] are the members' shares of the target output."""
    ffn, hidden = merged.up.shape[1:]
    device = merged.up.device
    share = dict(zip(group, weights.tolist(), strict=True))
    members = experts.chunks(group)  # a group that fits one chunk is brought over once
    gram = torch.zeros(ffn, ffn, device=device)
    cross = torch.zeros(ffn, hidden, device=device)
    for chunk in matcher.chunks(group):
        activations = merged.hidden(chunk, 0)  # [t, F] fp32
        target = torch.zeros(chunk.shape[0], hidden, device=device)
        for part, places in members:
            for e, at in places:
                # The members' fp32 weights one at a time: one expert's worth of memory.
                target += share[e] * (part.hidden(chunk, at) @ part.down[at].float().T)
        gram += activations.T @ activations
        cross += activations.T @ target
    return ridge_solve(gram, cross, merged.down[0].float().T).T.float()
