"""REAM's neuron matching (the official code's `Merger._merge`, merging "logits+weights"):
each member's neurons are matched one to one to its leader's (Hungarian method) by the sum of
two distances between a leader neuron and a member neuron:

- activations: each expert's ffn activations on a random sample of calibration tokens (up to
  32,768, drawn for each expert on its own, as `run_all_experts` draws them), the neuron's
  vector over its samples scaled to unit length; the distance of the two unit vectors. Each
  expert has its own sample, so the two vectors pair different tokens: that is the
  official code's (hcconvert's `--merge msmoe` compares activations on the same tokens);
- weights: every neuron's [gate row, up row, down column] scaled to unit length, the whole
  layer's rows reduced to 64 principal components (torch.pca_lowrank, seed 0; pca.py),
  scaled to unit length again; the distance of the two.
Activations are computed chunk by chunk over the samples, so only [F, F] sums are held.
E experts, F expert ffn, H hidden, S sampled tokens, q principal components.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..model.experts import Experts
from .pca import lowrank_pca

# Sampled tokens per expert: the official code draws 1024 * 32 // n_batches per batch of
# sequences, about this many in all.
SAMPLE_TOKENS = 1024 * 32
# Principal components of the neurons' weights (the official code's pca_dim).
PCA_COMPONENTS = 64
PCA_SEED = 0
# normalize_rows' guard against a zero norm in the official code.
NORM_EPS = 1e-8
SAMPLE_CHUNK = 4096


class ReamMatcher:
    """One MoE layer's calibration inputs x [T, H] and experts; REAM's neuron matching."""

    def __init__(self, x: torch.Tensor, experts: Experts, seed: int):
        self.x, self.experts, self.seed = x, experts, seed

    @functools.cached_property
    def samples(self) -> list[torch.Tensor]:
        """Each expert's sampled token indices: a permutation of the tokens cut to
        SAMPLE_TOKENS, drawn expert after expert from one numpy generator seeded with seed
        (the legacy generator the official code's np.random.permutation uses)."""
        generator = np.random.RandomState(self.seed)
        tokens = self.x.shape[0]
        return [torch.from_numpy(generator.permutation(tokens)[:SAMPLE_TOKENS]).to(self.x.device)
                for _ in range(len(self.experts))]

    @functools.cached_property
    def weight_features(self) -> torch.Tensor:
        """[E, F, q] fp32 unit rows: the neurons' unit weight rows projected on the layer's
        first q principal components, scaled by their singular values."""
        ffn, hidden = self.experts.up.shape[1:]
        projections = 2 if self.experts.gate is None else 3
        components = min(PCA_COMPONENTS, projections * hidden)
        mean, values, vectors = lowrank_pca(self._neuron_rows, components, PCA_SEED)
        projection = vectors * values  # [3H, q] (2H without a gate)
        features = torch.cat([(rows - mean) @ projection for rows in self._neuron_rows()])
        return _unit_rows(features).view(len(self.experts), ffn, components)

    def _neuron_rows(self) -> Iterator[torch.Tensor]:
        """[F, 3H] fp32 per expert, in order: each neuron's gate row, up row and down column,
        scaled to unit length (the official ffn_weight_matrix, then normalize_rows); experts
        without a gate (Nemotron-H's ReLU²) give [F, 2H]."""
        for chunk, places in self.experts.chunks():
            for _, at in places:
                parts = [chunk.up[at], chunk.down[at].T]
                gate = [] if chunk.gate is None else [chunk.gate[at]]
                rows = torch.cat(gate + parts, dim=1)
                yield _unit_rows(rows.float())

    def activation_distance(self, leader: int, member: int) -> torch.Tensor:
        """[F, F] fp64 distances between the leader's neurons (rows) and the member's (columns)
        as unit vectors of activations over their own token samples."""
        ffn = self.experts.up.shape[1]
        pair, (at_leader, at_member) = self.experts.select([leader, member])
        picks = self.samples[leader], self.samples[member]
        cross = torch.zeros(ffn, ffn, dtype=torch.float64, device=self.x.device)
        squares = torch.zeros(2, ffn, dtype=torch.float64, device=self.x.device)
        for start in range(0, len(picks[0]), SAMPLE_CHUNK):
            a = pair.hidden(self.x[picks[0][start:start + SAMPLE_CHUNK]], at_leader).float()
            b = pair.hidden(self.x[picks[1][start:start + SAMPLE_CHUNK]], at_member).float()
            cross += a.T @ b  # the in-place add promotes into fp64 without a copy
            squares += torch.stack([a.square().sum(0), b.square().sum(0)])
        # A single sample is not normalised (the official code's shape check).
        scale = (squares.sqrt() + NORM_EPS if len(picks[0]) > 1
                 else torch.ones_like(squares))
        unit_squares = squares / scale.square()
        dot = cross.div_(scale[0][:, None]).div_(scale[1][None, :])
        squared = unit_squares[0][:, None] + unit_squares[1][None, :] - 2 * dot
        return squared.clamp_min_(0).sqrt_()

    def permutation(self, leader: int, member: int) -> torch.Tensor:
        """[F] one-to-one matching of least total distance: the member's neuron perm[i]
        corresponds to the leader's neuron i."""
        features = self.weight_features
        cost = self.activation_distance(leader, member) + torch.cdist(
            features[leader], features[member]).double()
        _, columns = linear_sum_assignment(cost.cpu().numpy())
        return torch.from_numpy(columns).to(self.x.device)


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / (rows.norm(dim=-1, keepdim=True) + NORM_EPS)
