"""Matching the neurons of two experts by their activations on calibration tokens.

An expert's ffn neurons can be listed in any order: permuting the rows of gate and up and the
columns of down together leaves its output unchanged, so before weights are averaged the
neurons must correspond. Neuron f's activation is silu(gate_f·x)·(up_f·x) (or the family's
activation, with biases); two neurons
correspond when their activations correlate (Pearson) over the tokens the group is used on.
A group's tokens are those routed (top-k, original router) to any of its members, as in
M-SMoE and HC-SMoE; a group no token picked falls back to all tokens.

Everything runs over token chunks gathered from the resident layer input, with fp64 running
sums, so memory is bounded by one chunk's activations plus one [F, F] matrix.
F expert ffn, H hidden, T tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..model.experts import NEURON_AXIS, Experts
from ..resources import StageTimer
from .ream_alignment import ReamMatcher

ALIGN_CHUNK_TOKENS = 4096
# Guards the correlation of a neuron that never varies (dead on the group's tokens).
STD_FLOOR = 1e-12


class NeuronMatcher:
    """One MoE layer's calibration inputs and experts; matches neurons within groups.

    Results are cached per (group, dominant, member), so reductions that share groups (say
    msmoe and mergemoe after the same clustering) share the work. seed: REAM's token samples
    (ream_alignment.ReamMatcher, the `ream` attribute).
    """

    def __init__(self, x: torch.Tensor, selected: torch.Tensor, experts: Experts,
                 seed: int = 0, timer: StageTimer | None = None):
        self.x, self.selected, self.experts, self.seed = x, selected, experts, seed
        self.timer = timer or StageTimer()  # the matching's time, apart from the merge's
        self._cache: dict[tuple, torch.Tensor] = {}

    @functools.cached_property
    def ream(self) -> ReamMatcher:
        """REAM's matching of the same layer (built when a REAM merge first asks)."""
        return ReamMatcher(self.x, self.experts, self.seed)

    def group_tokens(self, group: list[int]) -> torch.Tensor:
        """Indices of the tokens routed to any member of the group (all tokens if none)."""
        members = torch.tensor(group, device=self.selected.device)
        picked = torch.isin(self.selected, members).any(dim=1).nonzero().squeeze(1)
        return picked if picked.numel() else torch.arange(self.x.shape[0], device=self.x.device)

    def chunks(self, group: list[int]) -> Iterator[torch.Tensor]:
        """The group's tokens in fp32 chunks of at most ALIGN_CHUNK_TOKENS rows."""
        tokens = self.group_tokens(group)
        for start in range(0, tokens.numel(), ALIGN_CHUNK_TOKENS):
            yield self.x[tokens[start:start + ALIGN_CHUNK_TOKENS]].float()

    def correlation(self, group: list[int], a: int, b: int) -> torch.Tensor:
        """[F, F] fp64 Pearson correlation of expert a's neurons (rows) with expert b's
        (columns) over the group's tokens."""
        ffn = self.experts.up.shape[1]
        pair, (at_a, at_b) = self.experts.select([a, b])
        sums = torch.zeros(4, ffn, dtype=torch.float64, device=self.x.device)  # a, b, a², b²
        cross = torch.zeros(ffn, ffn, dtype=torch.float64, device=self.x.device)
        count = 0
        for chunk in self.chunks(group):
            act_a, act_b = pair.hidden(chunk, at_a), pair.hidden(chunk, at_b)
            sums += torch.stack([act_a.sum(0), act_b.sum(0), act_a.square().sum(0),
                                 act_b.square().sum(0)])
            cross += act_a.T @ act_b  # the in-place add promotes into fp64 without a copy
            count += chunk.shape[0]
        mean_a, mean_b, square_a, square_b = sums / count
        std_a = (square_a - mean_a**2).clamp_min(0).sqrt()
        std_b = (square_b - mean_b**2).clamp_min(0).sqrt()
        # In place: at F = 14336 every [F, F] fp64 temporary is 1.6 GB.
        covariance = cross.div_(count).addr_(mean_a, mean_b, alpha=-1)
        covariance.div_(std_a.clamp_min(STD_FLOOR)[:, None])
        return covariance.div_(std_b.clamp_min(STD_FLOOR)[None, :])

    def permutation(self, group: list[int], dominant: int, member: int) -> torch.Tensor:
        """[F] one-to-one matching (Hungarian method, total correlation maximised): the
        member's neuron perm[i] corresponds to the dominant's neuron i (M-SMoE)."""
        def solve():
            cost = self.correlation(group, dominant, member).cpu().numpy()
            # The least total of the negated correlations, negated in place: maximize=True
            # would negate into a second [F, F] fp64 matrix (1.6 GB at Mixtral's F).
            _, columns = linear_sum_assignment(np.negative(cost, out=cost))
            return torch.from_numpy(columns).to(self.x.device)

        return self._cached(("permutation", tuple(group), dominant, member), solve)

    def assignment(self, group: list[int], dominant: int, member: int) -> torch.Tensor:
        """[F] many-to-one matching: the dominant's neuron each of the member's neurons
        correlates with most (HC-SMoE's fix-dom)."""
        return self._cached(("assignment", tuple(group), dominant, member),
                            lambda: self.correlation(group, dominant, member).argmax(dim=0))

    def _cached(self, key: tuple, compute) -> torch.Tensor:
        if key not in self._cache:
            with self.timer.stage("match"):
                self._cache[key] = compute()
        return self._cache[key]


def aligned(expert: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's tensors (by Experts field) with its neurons reordered by perm: rows of gate
    and up (and their biases) and columns of down together, so its output is unchanged."""
    return {name: tensor if NEURON_AXIS[name] is None
            else tensor.index_select(NEURON_AXIS[name], perm)
            for name, tensor in expert.items()}
