"""Fit a reduced MoE layer to the ORIGINAL layer's output ("reduce, then compensate").

Whatever a reduction keeps or merges, the reduced layer (new router, new top-k routing, kept
and merged experts) should reproduce what the original layer's routed experts computed on the
calibration tokens. With the reduced layer's routing held fixed, its output
    ŷ_t = Σ_k w_{t,k} · (down_{i(t,k)} a_{i(t,k)}(x_t) + b_{i(t,k)}),
    a_i(x) = silu(gate_i x) ⊙ (up_i x) (or the family's activation; b: down's bias, if any)
is linear in every expert's down projection, so block coordinate descent solves it exactly one
expert at a time: for expert r, with the others fixed, the tokens routed to r must supply the
residual y_t − ŷ_t + (r's current contribution), a ridge least-squares problem in down_r whose
normal equations ([F, F] and [F, H]) accumulate over token chunks. The ridge pulls towards the
unfitted down projection, so directions calibration never excites stay as they were. A few
rounds settle the tokens that two fitted experts share.

The calibration tokens are split: the fit sees the first part, the error is measured on the
held-out rest, and the fitted weights are kept only where they lower the held-out error.

Everything here works on plain tensors; the routing arrives as a callable, so families that
route differently (sigmoid scores, groups) plug in their own.
T tokens, H hidden, F expert ffn, R experts of the reduced layer, K top-k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .experts import Experts
from .lstsq import ridge_solve

# route(x [T, H]) -> (weights [T, K], index [T, K]): a layer's routing rule, router included
# (transformers' own router of the family, with the layer's reduced router tensors).
Route = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Share of the calibration tokens held out to check that the fit generalises.
HOLDOUT_FRACTION = 0.25
# Coordinate-descent sweeps over the experts: after two, the shared tokens barely move (the
# held-out error changes in the fourth digit on the bench models).
ROUNDS = 2
# λ relative to mean diag(AᵀA). Larger than lstsq.RIDGE: the fit has only the tokens routed to
# one expert, often fewer than F, and must not chase their noise.
FIT_RIDGE = 1e-2
CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class FitReport:
    """Relative held-out error ||ŷ − y||² / ||y||² of the layer before and after the fit."""

    error_before: float
    error_after: float
    fitted: bool  # whether the fitted weights were kept (they lowered the held-out error)

    @property
    def error(self) -> float:
        return self.error_after if self.fitted else self.error_before

    def to_json(self) -> dict:
        return {"error_unfitted": self.error_before, "error_fitted": self.error_after,
                "fitted": self.fitted}


def layer_output(x: torch.Tensor, experts: Experts, route: Route) -> torch.Tensor:
    """[T, H] fp32 routed-expert output of a layer on tokens x [T, H]."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for start in range(0, x.shape[0], CHUNK_TOKENS):
        chunk = x[start:start + CHUNK_TOKENS]
        weights, index = route(chunk)
        out[start:start + CHUNK_TOKENS] = _routed_sum(chunk, experts, None, weights, index)
    return out


def _routed_sum(x, experts: Experts, down: torch.Tensor | None, weights,
                index) -> torch.Tensor:
    """Σ_k weights[t, k] · expert index[t, k] (x_t), fp32 [T, H], with the experts' own down
    projections or down [R, H, F] (kept where the experts are)."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for chunk, places in experts.chunks(index.unique().tolist()):
        for e, at in places:
            token, slot = torch.where(index == e)
            projection = chunk.down[at] if down is None else down[e].to(x.device)
            y = chunk.hidden(x[token].float(), at) @ projection.float().T
            if chunk.down_bias is not None:
                y += chunk.down_bias[at].float()
            out.index_add_(0, token, y * weights[token, slot, None].float())
    return out


def relative_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return ((predicted - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)).item()


def fit_down(x: torch.Tensor, target: torch.Tensor, experts: Experts, route: Route,
             rounds: int = ROUNDS, ridge: float = FIT_RIDGE) -> torch.Tensor:
    """[R, H, F] fp32 down projections (kept where the experts are) that make the reduced
    layer (its experts, routing fixed by route) reproduce target [T, H] on x [T, H]; ridge
    towards experts.down. The experts come to the device a chunk at a time."""
    weights, index = route(x)  # [T, K] each
    down = experts.down.float().clone()
    predicted = _routed_sum(x, experts, down, weights, index)
    for _ in range(rounds):
        # Nothing routed to an expert: it stays as it was.
        for chunk, places in experts.chunks(index.unique().tolist()):
            for e, at in places:
                token, slot = torch.where(index == e)
                gate_weight = weights[token, slot].float()
                current = down[e].to(x.device)
                new = _fit_one(x, target, predicted, chunk, at, current, token, gate_weight,
                               ridge)
                scaled = _scaled_activations(x, chunk, at, token, gate_weight)
                predicted.index_add_(0, token, scaled @ (new - current).T)
                down[e] = new
    return down


def _scaled_activations(x, experts: Experts, e: int, token, gate_weight) -> torch.Tensor:
    """[n, F] routing weight × activations of expert e on its routed tokens."""
    return experts.hidden(x[token].float(), e) * gate_weight[:, None]


def _fit_one(x, target, predicted, experts: Experts, e: int, current: torch.Tensor, token,
             gate_weight, ridge: float) -> torch.Tensor:
    """Expert e's [H, F] down projection (now `current`), the others fixed: the normal
    equations over its routed tokens in chunks, fp64 sums."""
    ffn, hidden = experts.gate.shape[1], x.shape[1]
    gram = torch.zeros(ffn, ffn, dtype=torch.float64, device=x.device)
    cross = torch.zeros(ffn, hidden, dtype=torch.float64, device=x.device)
    for start in range(0, token.numel(), CHUNK_TOKENS):
        part = token[start:start + CHUNK_TOKENS]
        a = _scaled_activations(x, experts, e, part, gate_weight[start:start + CHUNK_TOKENS])
        # What expert e must supply on these tokens: the residual plus its current share.
        wanted = target[part] - predicted[part] + a @ current.T  # [n, H]
        gram += a.T @ a
        cross += a.T @ wanted
    return ridge_solve(gram, cross, experts.down[e].float().T, ridge).T.float()


def fit_layer(x: torch.Tensor, target: torch.Tensor, experts: Experts, route: Route,
              holdout: float = HOLDOUT_FRACTION) -> tuple[Experts, FitReport]:
    """Experts with down projections fitted on the first part of x [T, H] so the reduced
    layer reproduces target [T, H]; kept only if the held-out tokens agree. The report gives
    the held-out relative errors before and after."""
    cut = max(1, int(x.shape[0] * (1 - holdout)))
    down = fit_down(x[:cut], target[:cut], experts, route)
    fitted = dataclasses.replace(experts, down=down.to(experts.down.dtype))
    held_x, held_y = x[cut:], target[cut:]
    before = relative_error(layer_output(held_x, experts, route), held_y)
    after = relative_error(layer_output(held_x, fitted, route), held_y)
    report = FitReport(before, after, after < before)
    return (fitted if report.fitted else experts), report
