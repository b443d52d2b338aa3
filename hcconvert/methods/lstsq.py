"""Ridge least squares towards a prior, in fp32 by Cholesky, in the smaller of two forms.

The lse-fit router, the MergeMoE down projection and the layer fit solve
    min_W ||A W - Y||² + λ ||W - W0||²,   A [n, m] (n rows of calibration, m unknowns)
whose solution is W = W0 + D with
    (AᵀA + λI) D = Aᵀ(Y - A W0)        primal: an [m, m] system, from sums over row chunks
    D = Aᵀ (AAᵀ + λI)⁻¹ (Y - A W0)     dual: an [n, n] system, for fewer rows than unknowns
(the same D: Aᵀ(AAᵀ + λI)⁻¹ = (AᵀA + λI)⁻¹Aᵀ). At Mixtral's expert width (m = 14336) and a
reduced calibration (n in the hundreds per expert) the dual system is hundreds of times
smaller. λ = relative ridge × ||A||² / m, the mean diagonal of AᵀA, in either form; the pull
towards W0 keeps directions the calibration never excites at the prior instead of at zero. The
ridge makes the system positive definite, so Cholesky in fp32 solves it: against the fp64 LU
solve it replaced, the layer fit's projections differ by 7e-7 (primal) and 3e-5 to 6e-5
(dual) relative, and its layer errors agree to four digits (docs/DESIGN.md). No fp64, and no
O(m³) work beyond one factorisation per solve.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# λ relative to the mean diagonal of the Gram matrix: small enough to fit the targets, large
# enough to keep the solve well-posed when calibration spans few directions.
RIDGE = 1e-3


# Where torch.mm takes out_dtype=float32 for half operands (the meta device: its shapes and
# dtypes only, what the tests check).
WIDE_PRODUCT_DEVICES = ("cuda", "meta")
HALF = (torch.bfloat16, torch.float16)


def wide_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 from operands in the compute dtype: on a GPU, half-precision operands go
    through the tensor cores with fp32 accumulation and an fp32 result (torch.mm's
    out_dtype), the layer fit's large products at the compute dtype's rate; elsewhere (the CPU
    has no such kernel) the operands are widened first. b is brought to a's dtype."""
    b = b.to(a.dtype)
    if a.device.type in WIDE_PRODUCT_DEVICES and a.dtype in HALF:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def rounded_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b where a result rounded to a's dtype loses nothing that matters: an output the
    reduced model itself computes in that dtype, or a change to a projection stored in it. On
    the CPU half-precision operands then take its matrix unit (fp32 accumulation, the result
    in a's dtype), where widening them runs at the fp32 rate, 4 to 5 times slower with AMX;
    elsewhere it is wide_product (fp32)."""
    if a.device.type == "cpu" and a.dtype in HALF:
        return a @ b.to(a.dtype)
    return wide_product(a, b)


# Columns per block of a Gram matrix: only the blocks on and below the diagonal are multiplied
# (it is symmetric), (b + 1) / 2b of the whole product's FLOPs for b blocks (57 % at Mixtral's
# F = 14336), while each block's product stays large enough to run at the device's rate.
GRAM_BLOCK = 2048


def gram_matrix(parts: Iterable[torch.Tensor], columns: int,
                device: torch.device) -> torch.Tensor:
    """Σ aᵀa [columns, columns] fp32 over the row blocks a [rows, columns] of one matrix (in
    the compute dtype: wide_product), by its lower block triangle, mirrored at the end."""
    out = torch.zeros(columns, columns, device=device)
    for a in parts:
        for start in range(0, columns, GRAM_BLOCK):
            stop = start + GRAM_BLOCK
            out[start:, start:stop] += wide_product(a[:, start:].T, a[:, start:stop])
    for start in range(GRAM_BLOCK, columns, GRAM_BLOCK):
        stop = start + GRAM_BLOCK
        out[:start, start:stop] = out[start:stop, :start].T
    return out


def gram_flops(rows: int, columns: int) -> float:
    """FLOPs of gram_matrix() over rows in all of a [rows, columns] matrix: its blocks'."""
    return sum(2 * rows * (columns - start) * min(GRAM_BLOCK, columns - start)
               for start in range(0, columns, GRAM_BLOCK))


class RidgeSystem:
    """One Gram matrix (AᵀA [m, m] or AAᵀ [n, n], fp32), solved against several right-hand
    sides and ridges (the layer fit's rounds and its choice of ridge share it). Each solve
    factors gram + λI anew: a factorisation is as large as the Gram matrix, and at most one
    is held at a time."""

    def __init__(self, gram: torch.Tensor, unknowns: int | None = None):
        """unknowns: A's columns m (default: gram's size, the primal form). λ is relative to
        ||A||² / m, the mean diagonal of AᵀA, in either form, so both give one solution."""
        self.gram = gram.float()
        columns = unknowns or self.gram.shape[0]
        self.scale = max(self.gram.diagonal().sum().item() / columns, 1e-12)

    def solve(self, rhs: torch.Tensor, relative_ridge: float) -> torch.Tensor:
        """(gram + λI)⁻¹ rhs, fp32, rhs [size, k]; λ = relative_ridge × ||A||² / m."""
        # The ridge goes onto the Gram matrix itself and its diagonal is put back exactly:
        # a copy would hold a third matrix of its size.
        diagonal = self.gram.diagonal().clone()
        self.gram.diagonal().add_(relative_ridge * self.scale)
        try:
            factor = torch.linalg.cholesky(self.gram)
        finally:
            self.gram.diagonal().copy_(diagonal)
        return torch.cholesky_solve(rhs.float(), factor)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor,
                relative_ridge: float = RIDGE) -> torch.Tensor:
    """W [m, k] fp32 from the primal sums gram = AᵀA [m, m], cross = AᵀY [m, k] and the prior
    W0 [m, k]: W = W0 + (AᵀA + λI)⁻¹ (AᵀY − AᵀA W0)."""
    system = RidgeSystem(gram)
    prior = prior.float().to(cross.device)
    return prior + system.solve(cross.float() - system.gram @ prior, relative_ridge)
