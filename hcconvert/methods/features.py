"""Similarity features for grouping experts besides their mean outputs (statistics.py).

- router-logits: each expert's router-logit column on a fixed, seeded sample of calibration
  tokens: experts the router treats alike are alike (M-SMoE's similarity).
- weights: the expert's gate, up and down weights (and biases) flattened and concatenated.
  Those vectors have E·3·F·H entries (GBs for large models), but every grouping compares
  experts only through Euclidean distances (and k-means through means, which an isometry
  keeps too), so we hand the clustering E coordinates per expert with exactly the same
  pairwise distances, computed from the [E, E] Gram matrix in bounded memory.
"""

from __future__ import annotations

import torch

from ..model.experts import Experts

# What an expert is compared by: its mean output over the calibration tokens, its router-logit
# column on sampled tokens, or its flattened weights.
METRICS = ("output", "router-logits", "weights")

ROUTER_SAMPLE_TOKENS = 8192
# Values per Gram block (E x rows x H): bounds its fp64 copy to 256 MB.
GRAM_BLOCK_VALUES = 2**25


def router_logit_features(x: torch.Tensor, router: torch.Tensor, seed: int) -> torch.Tensor:
    """[E, S] router logits (fp32, on the CPU) of up to ROUTER_SAMPLE_TOKENS tokens of x,
    drawn without replacement with `seed` and kept in token order."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(x.shape[0], generator=generator)[:ROUTER_SAMPLE_TOKENS].sort().values
    return (x[sample.to(x.device)].float() @ router.float().T).T.cpu()


def weight_gram(experts: Experts) -> torch.Tensor:
    """[E, E] Gram matrix of the experts' flattened weights, in fp64 block by block: near-
    duplicate experts differ by a small fraction of their norm, which fp32 sums would blur.
    Each block (every expert's rows of one slice) moves to the compute device on its own, so
    experts kept on the host stay there."""
    num, device = len(experts), experts.device
    gram = torch.zeros(num, num, dtype=torch.float64, device=device)
    rows = max(1, GRAM_BLOCK_VALUES // (num * experts.up.shape[2]))
    # down is [E, H, F]: its transpose has the same F-major rows as gate and up.
    parts = {**experts.parts(), "down": experts.down.transpose(1, 2)}
    for stacked in parts.values():
        for start in range(0, stacked.shape[1], rows):
            block = stacked[:, start:start + rows].to(device).reshape(num, -1).double()
            gram += block @ block.T
    return gram


def isometric_embedding(gram: torch.Tensor) -> torch.Tensor:
    """[E, E] points whose pairwise Euclidean distances equal those of the vectors behind
    the Gram matrix (classical multidimensional scaling, which is exact for a Gram matrix)."""
    num = gram.shape[0]
    centre = torch.eye(num, dtype=gram.dtype, device=gram.device) - 1.0 / num
    values, vectors = torch.linalg.eigh(centre @ gram @ centre)
    # Rounding leaves tiny negative eigenvalues where the true ones are zero.
    return vectors * values.clamp_min(0).sqrt()


def weight_features(experts: Experts) -> torch.Tensor:
    """[E, E] fp64 coordinates (on the CPU) with the pairwise distances of the flattened
    gate/up/down weights."""
    return isometric_embedding(weight_gram(experts)).cpu()
