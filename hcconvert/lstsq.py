"""Ridge least squares towards a prior, from accumulated normal equations.

Both the lse-fit router and the MergeMoE down projection solve
    min_W ||X W - Y||² + λ ||W - W0||²   i.e.   (XᵀX + λI) W = XᵀY + λ W0,
with XᵀX and XᵀY summed over calibration chunks. The pull towards W0 keeps directions the
calibration tokens never excite at the prior instead of at zero.
"""

from __future__ import annotations

import torch

# λ relative to the mean diagonal of XᵀX: small enough to fit the targets, large enough to keep
# the solve well-posed when calibration spans few directions.
RIDGE = 1e-3


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor,
                relative_ridge: float = RIDGE) -> torch.Tensor:
    """W [D, K] (gram's dtype) from gram = XᵀX [D, D], cross = XᵀY [D, K], prior W0 [D, K];
    λ = relative_ridge × mean diag(XᵀX).

    Overwrites gram and cross: at D = 14336 each fp64 copy would be 1.6 GB.
    """
    ridge = relative_ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, cross.add_(prior.to(cross), alpha=ridge.item()))
