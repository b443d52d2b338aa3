"""Ridge least squares towards a prior, from accumulated normal equations.

The lse-fit router, the MergeMoE down projection and the layer fit solve
    min_W ||X W - Y||² + λ ||W - W0||²   i.e.   (XᵀX + λI) W = XᵀY + λ W0,
with XᵀX and XᵀY summed over calibration chunks. The pull towards W0 keeps directions the
calibration tokens never excite at the prior instead of at zero.
"""

from __future__ import annotations

import torch

# λ relative to the mean diagonal of XᵀX: small enough to fit the targets, large enough to keep
# the solve well-posed when calibration spans few directions.
RIDGE = 1e-3


class RidgeSystem:
    """XᵀX + λI, LU-factored once, for solving against several XᵀY (the layer fit's rounds
    share X). λ = relative_ridge × mean diag(XᵀX). Solving equals torch.linalg.solve's result
    bit for bit (the same LAPACK factorisation and substitution)."""

    def __init__(self, gram: torch.Tensor, relative_ridge: float = RIDGE):
        """gram = XᵀX [D, D]; overwritten (at D = 14336 each fp64 copy would be 1.6 GB)."""
        self.ridge = relative_ridge * gram.diagonal().mean().clamp_min(1e-12).item()
        gram.diagonal().add_(self.ridge)
        self.lu, self.pivots = torch.linalg.lu_factor(gram)

    def solve(self, cross: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """W [D, K] (the gram's dtype) from cross = XᵀY [D, K], which it overwrites, and the
        prior W0 [D, K]."""
        return torch.linalg.lu_solve(self.lu, self.pivots,
                                     cross.add_(prior.to(cross), alpha=self.ridge))

    @property
    def bytes(self) -> int:
        return self.lu.numel() * self.lu.element_size() + self.pivots.numel() * 4


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor,
                relative_ridge: float = RIDGE) -> torch.Tensor:
    """W [D, K] (gram's dtype) from gram = XᵀX [D, D], cross = XᵀY [D, K], prior W0 [D, K];
    one right-hand side of RidgeSystem. Overwrites gram and cross."""
    return RidgeSystem(gram, relative_ridge).solve(cross, prior)
