"""torch.pca_lowrank's randomized PCA of a tall matrix that is never formed whole.

REAM describes every neuron of every expert by its weights, a [E·F, 3H] matrix (45 GB in fp32
for one DeepSeek-V3 layer), and reduces it to 64 principal components with torch.pca_lowrank
(seeded with 0). The algorithm (Halko et al. 2009, Algorithm 5.1 with two subspace iterations)
touches the matrix only through products A·M and Aᵀ·M, which sum over row blocks; so here the
matrix arrives block by block, from a function that can produce the blocks again, and only
[m, q] and [n, q] matrices are held. The steps and the one random draw are torch's, so the
result equals torch.pca_lowrank's up to the order of floating-point sums.
m rows, n columns, q components.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

# torch.pca_lowrank's default subspace iterations.
SUBSPACE_ITERATIONS = 2

# blocks() -> the matrix's row blocks [b, n] fp32, in order, all on one device; callable again.
RowBlocks = Callable[[], Iterator[torch.Tensor]]


def lowrank_pca(blocks: RowBlocks, q: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """(mean [n], S [q], V [n, q]) of the centred matrix A - mean, as torch.pca_lowrank(A, q)
    after torch.manual_seed(seed) returns S and V: (A - mean)·V·diag(S) are its rows projected
    on the first q principal directions, scaled by their singular values; q <= min(m, n)."""
    mean, rows = _column_mean(blocks)
    if rows < mean.shape[0]:  # wide, hence small: torch transposes it, so take torch's own
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, values, vectors = torch.pca_lowrank(torch.cat(list(blocks())) - mean, q=q)
        return mean, values, vectors

    def centred() -> Iterator[torch.Tensor]:
        return (block - mean for block in blocks())

    columns = mean.shape[0]
    # torch's one random draw: a [n, q] Gaussian from the CPU generator, as pca_lowrank makes
    # it for a matrix on the CPU (where REAM's code holds the weights).
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(columns, q, generator=generator).to(mean.device)
    basis = _orthonormal(_times(centred, start))  # [m, q]
    for _ in range(SUBSPACE_ITERATIONS):
        basis = _orthonormal(_times(centred, _orthonormal(_transpose_times(centred, basis))))
    projected = _transpose_times(centred, basis).T  # Qᵀ·A [q, n]
    _, values, vectors_h = torch.linalg.svd(projected, full_matrices=False)
    return mean, values, vectors_h.mH


def _column_mean(blocks: RowBlocks) -> tuple[torch.Tensor, int]:
    """[n] fp32 mean of the rows, summed in fp64, and how many rows there are."""
    total, rows = None, 0
    for block in blocks():
        part = block.sum(0, dtype=torch.float64)
        total = part if total is None else total + part
        rows += block.shape[0]
    return (total / rows).float(), rows


def _times(blocks: RowBlocks, matrix: torch.Tensor) -> torch.Tensor:
    """A·M [m, q]: each block's rows times M."""
    return torch.cat([block @ matrix for block in blocks()])


def _transpose_times(blocks: RowBlocks, matrix: torch.Tensor) -> torch.Tensor:
    """Aᵀ·M [n, q] for M [m, q]: summed over the row blocks."""
    total, start = None, 0
    for block in blocks():
        part = block.T @ matrix[start:start + block.shape[0]]
        total = part if total is None else total + part
        start += block.shape[0]
    return total


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix).Q
