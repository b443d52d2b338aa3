"""Per-MoE-layer calibration statistics, computed once per layer for every reduction that
reads them: router frequencies and choices, and on request expert output means, router-logit
and weight features, and routed saliency.

T tokens, E experts, F expert ffn, H hidden, K top-k, R groups.
An expert's output feature is its mean output over ALL calibration tokens, routed to it or not.
By linearity, mean_t down(silu(gate x_t) * up x_t) = (sum_t silu(gate x_t) * up x_t / T) @ downᵀ,
so only the [E, F] activation sums are needed; `expert_act_sums` fuses that on the GPU for
SiLU experts without biases, a torch path serves the others (GPT-OSS: the same identity with
its activation, plus the down bias).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..errors import first_line
from ..kernels.expert_sums import expert_act_sums, expert_act_sums_torch
from ..model.activation import SILU
from ..model.experts import Experts, RoutingRecord
from .features import router_logit_features, weight_features
from .ream import ReamStats, ream_statistics

ROUTER_CHUNK_TOKENS = 16384
# What collect_layer_stats can compute besides the routing: the three similarity metrics
# (options.METRICS), O-prune's saliency and REAM's statistics as its official code takes them.
OPTIONAL_STATS = ("output", "router-logits", "weights", "saliency", "ream")


def activation_sums(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, F] fp32 sums over tokens of silu(x·gate)·(x·up): Triton on CUDA, torch elsewhere,
    and torch on CUDA too once the kernel has failed to build here."""
    if x.is_cuda and not _triton_failed:
        try:
            return expert_act_sums(x, gate, up)
        except Exception as err:  # Triton's build errors vary: no C compiler, unsupported GPU
            _triton_failed.append(err)
            print(f"warning: the Triton kernel failed ({type(err).__name__}: "
                  f"{first_line(err)}); using the torch path", file=sys.stderr)
    return expert_act_sums_torch(x, gate, up)


_triton_failed: list[Exception] = []  # set once per process: never retry a broken build


def statistics_kernel(device: torch.device) -> str:
    """Which implementation computes the activation sums on device: "triton" or "torch"."""
    return "triton" if device.type == "cuda" and not _triton_failed else "torch"


@dataclass
class LayerStats:
    """What one MoE layer's calibration pass measured; optional parts are None unless asked."""

    tokens: int
    counts: torch.Tensor  # [E] times each expert was in a token's top-k
    logit_mean: torch.Tensor  # [E] mean router logit
    selected: torch.Tensor  # [T, K] each token's top-k experts, on the device of the inputs
    output_mean: torch.Tensor | None = None  # [E, H] mean expert output over all tokens, fp32
    router_features: torch.Tensor | None = None  # [E, S] router logits on sampled tokens
    weight_features: torch.Tensor | None = None  # [E, E] isometric image of flattened weights
    saliency: torch.Tensor | None = None  # [E] mean routed weight x output norm (REAP)
    ream: ReamStats | None = None  # REAM's official statistics (ream.py)

    def features(self, metric: str) -> torch.Tensor:
        """The [E, D] similarity features of one metric (options.METRICS)."""
        found = {"output": self.output_mean, "router-logits": self.router_features,
                 "weights": self.weight_features}[metric]
        if found is None:
            raise ValueError(f"the {metric!r} features were not collected")
        return found


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """[T, E] fp32 router logits x·Wᵀ from fp32 operands (a bf16 product can reorder
    near-tied experts)."""
    return x.float() @ router.float().T


def logit_sums(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """[E] fp64 sums of the router logits over tokens x: [T, H], chunked."""
    total = torch.zeros(router.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], ROUTER_CHUNK_TOKENS):
        total += router_logits(x[start:start + ROUTER_CHUNK_TOKENS], router).sum(0).double()
    return total


def output_means(x: torch.Tensor, experts: Experts,
                 sums: torch.Tensor | None = None) -> torch.Tensor:
    """[E, H] fp32 mean output of every expert over all tokens x: [T, H], a chunk of experts
    on the device at a time; sums: the [E, F] activation sums over x if the forward already
    formed them."""
    means = []
    for chunk, places in experts.chunks():
        mean_act = (_all_activation_sums(x, chunk) if sums is None
                    else sums[[e for e, _ in places]].to(x.device)) / x.shape[0]  # [e, F]
        # Expert by expert: an fp32 copy of every down projection at once would cost GBs.
        means += [chunk.down[at].float() @ mean_act[i] for i, (_, at) in enumerate(places)]
    means = torch.stack(means)
    return means if experts.down_bias is None else \
        means + experts.down_bias.to(means.device).float()


def _all_activation_sums(x: torch.Tensor, experts: Experts) -> torch.Tensor:
    """[E, F] fp32 sums over tokens of every expert's activations."""
    if experts.activation == SILU and experts.gate is not None and experts.gate_bias is None:
        return activation_sums(x, experts.gate, experts.up)
    sums = torch.zeros(experts.up.shape[:2], device=x.device)
    for start in range(0, x.shape[0], ROUTER_CHUNK_TOKENS):
        chunk = x[start:start + ROUTER_CHUNK_TOKENS].float()
        for e in range(len(experts)):
            sums[e] += experts.hidden(chunk, e).sum(0)
    return sums


def collect_layer_stats(x: torch.Tensor, selected: torch.Tensor, router: torch.Tensor,
                        experts: Experts, needs: frozenset[str] = frozenset({"output"}),
                        seed: int = 42, record: RoutingRecord | None = None) -> LayerStats:
    """Statistics for one MoE layer from its inputs x: [T, H] (post-attention-norm) and the
    experts the router chose for them, selected: [T, K].

    needs names the optional parts (OPTIONAL_STATS) to compute; the routing is always measured.
    The saliency, and the activation sums behind the output means where the record asked the
    forward for them, come from the record of the layer's forward, which computed the routed
    outputs anyway.
    """
    unknown = set(needs) - set(OPTIONAL_STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    tokens = x.shape[0]
    # What the router read: the experts' inputs x, or its own reads where they differ.
    router_x = x if record is None else record.router_inputs(x)
    counts = torch.bincount(selected.flatten(), minlength=len(experts)).float().cpu()
    stats = LayerStats(tokens, counts, (logit_sums(router_x, router) / tokens).float().cpu(),
                       selected)
    if "output" in needs:
        stats.output_mean = output_means(x, experts, None if record is None else record.sums).cpu()
    if "router-logits" in needs:
        stats.router_features = router_logit_features(router_x, router, seed)
    if "weights" in needs:
        stats.weight_features = weight_features(experts)
    if "saliency" in needs:
        if record is None or not record.saliency:
            raise ValueError("the saliency needs a forward that recorded it")
        stats.saliency = record.mean_saliency(len(experts)).cpu()
    if "ream" in needs:
        stats.ream = ream_statistics(x, router, experts, selected.shape[1])
    return stats


def group_logsumexp_gram(x: torch.Tensor, router: torch.Tensor, groups: list[list[int]]):
    """XᵀX [H, H] and Xᵀy [H, R], y_c = log Σ_{i in group c} exp(x·w_i).

    These are the normal equations of the router fit that makes each merged expert's logit
    carry its members' combined softmax mass.
    """
    hidden = x.shape[1]
    gram = torch.zeros(hidden, hidden, device=x.device)
    cross = torch.zeros(hidden, len(groups), device=x.device)
    for start in range(0, x.shape[0], ROUTER_CHUNK_TOKENS):
        chunk = x[start:start + ROUTER_CHUNK_TOKENS].float()
        logits = chunk @ router.float().T
        targets = torch.stack([logits[:, g].logsumexp(-1) for g in groups], dim=1)
        gram += chunk.T @ chunk
        cross += chunk.T @ targets
    return gram, cross
