"""Per-MoE-layer calibration statistics: expert output means, router frequencies, logit means.

T tokens, E experts, F expert ffn, H hidden, R groups.
An expert's feature is its mean output over ALL calibration tokens, routed to it or not.
By linearity, mean_t down(silu(gate x_t) * up x_t) = (sum_t silu(gate x_t) * up x_t / T) @ downᵀ,
so only the [E, F] activation sums are needed; `expert_act_sums` fuses that on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.expert_sums import expert_act_sums, expert_act_sums_torch
from .modeling import Experts, Routing, route, router_logits

ROUTER_CHUNK_TOKENS = 16384


def activation_sums(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, F] fp32 sums over tokens of silu(x·gate)·(x·up): Triton on CUDA, torch elsewhere."""
    if x.is_cuda:
        return expert_act_sums(x, gate, up)
    return expert_act_sums_torch(x, gate, up)


@dataclass
class LayerStats:
    """What one MoE layer's calibration pass measured."""

    tokens: int
    counts: torch.Tensor  # [E] times each expert was in a token's top-k
    logit_mean: torch.Tensor  # [E] mean router logit
    output_mean: torch.Tensor  # [E, H] mean expert output over all tokens, fp32

    @property
    def frequencies(self) -> torch.Tensor:
        """Fraction of tokens that picked each expert (sums to top-k)."""
        return self.counts / max(self.tokens, 1)


def router_stats(x: torch.Tensor, router: torch.Tensor, routing: Routing):
    """Top-k selection counts [E] and router-logit sums [E] (fp32), chunked over tokens."""
    counts = torch.zeros(router.shape[0], dtype=torch.float64, device=x.device)
    logit_sum = torch.zeros(router.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], ROUTER_CHUNK_TOKENS):
        logits = router_logits(x[start:start + ROUTER_CHUNK_TOKENS], router, routing)
        _, index = route(logits, routing)
        counts += torch.bincount(index.flatten(), minlength=router.shape[0]).double()
        logit_sum += logits.sum(0).double()
    return counts.float(), logit_sum.float()


def collect_layer_stats(x: torch.Tensor, router: torch.Tensor, experts: Experts,
                        routing: Routing) -> LayerStats:
    """Statistics for one MoE layer from its inputs x: [T, H] (post-attention-norm)."""
    tokens = x.shape[0]
    counts, logit_sum = router_stats(x, router, routing)
    sums = activation_sums(x, experts.gate, experts.up)  # [E, F]
    mean_act = (sums / tokens).unsqueeze(1)  # [E, 1, F]
    output_mean = torch.bmm(mean_act, experts.down.float().transpose(1, 2)).squeeze(1)  # [E, H]
    return LayerStats(tokens, counts.cpu(), (logit_sum / tokens).cpu(), output_mean.cpu())


def group_logsumexp_gram(x: torch.Tensor, router: torch.Tensor, groups: list[list[int]]):
    """XᵀX [H, H] and Xᵀy [H, R], y_c = log Σ_{i in group c} exp(x·w_i).

    These are the normal equations of the router fit that makes each merged expert's logit
    carry its members' combined softmax mass.
    """
    hidden = x.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=x.device)
    cross = torch.zeros(hidden, len(groups), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], ROUTER_CHUNK_TOKENS):
        # fp32 products per chunk, fp64 running sums: exact enough, and fast on any GPU.
        chunk = x[start:start + ROUTER_CHUNK_TOKENS].float()
        logits = chunk @ router.float().T
        targets = torch.stack([logits[:, g].logsumexp(-1) for g in groups], dim=1)
        gram += (chunk.T @ chunk).double()
        cross += (chunk.T @ targets).double()
    return gram, cross
