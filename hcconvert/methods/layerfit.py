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

from ..model.experts import Experts
from .lstsq import RidgeSystem

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
# What the fit keeps from one round to the next, for all of a layer's experts together: each
# expert's factored normal equations ([F, F] fp64) and, when its tokens make one chunk, their
# activations. Within it, a round after the first forms just Aᵀr and the update; beyond it,
# an expert recomputes its activations and AᵀA. At the bench's shapes (F = 2048, 4 experts
# kept, 6144 tokens: 0.23 GB kept) fit_down takes 2.2 s, 4.0 s with nothing kept
# (bench/bench_fit.py); 4.6 s before both this and the change form (_fit_one).
FIT_KEEP_BYTES = 1 << 30


def kept_bytes(tokens: int, top_k: int, experts: int, ffn: int) -> int:
    """The most fit_down keeps between rounds (capped by FIT_KEEP_BYTES) when it fits `experts`
    experts of `ffn` neurons, routed top-`top_k`, on `tokens` tokens: each expert's factored
    normal equations and every routed token's activations."""
    return min(FIT_KEEP_BYTES, experts * ffn * (ffn + 1) * 8 + tokens * top_k * ffn * 4)


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
        out[start:start + CHUNK_TOKENS] = _routed_sum(chunk, experts, _routed_fits(*route(chunk)))
    return out


def _routed_fits(weights: torch.Tensor, index: torch.Tensor) -> dict[int, _ExpertFit]:
    """Each expert some token picked ([T, K] each), with its routed tokens and weights."""
    return {e: _ExpertFit.routed(e, weights, index) for e in index.unique().tolist()}


def _routed_sum(x, experts: Experts, fits: dict[int, _ExpertFit],
                keep: _KeepBudget | None = None) -> torch.Tensor:
    """Σ_k weights[t, k] · expert index[t, k] (x_t), fp32 [T, H], over the routing of fits;
    keep: what the experts' activations may keep for fit_down's rounds."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for chunk, places in experts.chunks(list(fits)):
        for e, at in places:
            fit = fits[e]
            fit.add_output(out, x, chunk, at, chunk.down[at].float(), keep)
            if chunk.down_bias is not None:  # part of the output; the fit leaves it as it is
                out.index_add_(0, fit.token, fit.gate_weight[:, None] * chunk.down_bias[at].float())
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
    fits = _routed_fits(weights, index)  # nothing routed to an expert: it stays as it was
    keep = _KeepBudget(FIT_KEEP_BYTES)
    predicted = _routed_sum(x, experts, fits, keep)  # the layer's output
    for _ in range(rounds):
        for chunk, places in experts.chunks(list(fits)):
            for e, at in places:
                current = down[e].to(x.device)
                change = _fit_one(x, target, predicted, chunk, at, current, fits[e], ridge,
                                  keep)
                fits[e].add_output(predicted, x, chunk, at, change)
                down[e] = current + change
    return down


class _KeepBudget:
    """Bytes the fit may still keep from one round to the next (FIT_KEEP_BYTES)."""

    def __init__(self, total: int):
        self.left = total

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


@dataclass
class _ExpertFit:
    """One expert's share of the fit: its routed tokens and their routing weights, and what
    stays the same in every round (the routing is fixed): its scaled activations, when its
    tokens make one chunk, and its factored normal equations. Kept (within FIT_KEEP_BYTES),
    they are computed once instead of in every round."""

    token: torch.Tensor  # [n]
    gate_weight: torch.Tensor  # [n] fp32
    activations: torch.Tensor | None = None  # [n, F] fp32, for n <= CHUNK_TOKENS
    system: RidgeSystem | None = None

    @classmethod
    def routed(cls, e: int, weights: torch.Tensor, index: torch.Tensor) -> _ExpertFit:
        token, slot = torch.where(index == e)
        return cls(token, weights[token, slot].float())

    def scaled_activations(self, x, experts: Experts, e: int):
        """(token chunk, routing weight × expert e's activations on it [n, F]) in turn."""
        if self.activations is not None:
            yield self.token, self.activations
            return
        for start in range(0, self.token.numel(), CHUNK_TOKENS):
            part = self.token[start:start + CHUNK_TOKENS]
            yield part, (experts.hidden(x[part].float(), e)
                         * self.gate_weight[start:start + CHUNK_TOKENS, None])

    def add_output(self, predicted: torch.Tensor, x, experts: Experts, e: int,
                   down: torch.Tensor, keep: _KeepBudget | None = None) -> None:
        """Add the expert's routed output with down projection down [H, F] to predicted;
        keep its activations if keep allows."""
        for part, scaled in self.scaled_activations(x, experts, e):
            predicted.index_add_(0, part, scaled @ down.T)
            if (keep is not None and part.numel() == self.token.numel()
                    and keep.take(scaled.numel() * 4)):
                self.activations = scaled


def _fit_one(x, target, predicted, experts: Experts, e: int, current: torch.Tensor,
             fit: _ExpertFit, ridge: float, keep: _KeepBudget) -> torch.Tensor:
    """The change [H, F] to expert e's down projection (now `current`) that fits the layer
    best with the others fixed: the normal equations over its routed tokens in chunks, fp64
    sums (AᵀA only while not kept). With A its scaled activations, r the residual
    target − predicted, W0 the unfitted projection, λ the ridge, the new projection W solves
    (AᵀA + λI) Wᵀ = Aᵀ(r + A currentᵀ) + λ W0ᵀ; less (AᵀA + λI) currentᵀ on both sides,
    the change solves (AᵀA + λI) Δᵀ = Aᵀr + λ (W0 − current)ᵀ: one product of A fewer."""
    ffn, hidden = experts.up.shape[1], x.shape[1]
    gram = None if fit.system is not None else torch.zeros(ffn, ffn, dtype=torch.float64,
                                                           device=x.device)
    cross = torch.zeros(ffn, hidden, dtype=torch.float64, device=x.device)
    for part, a in fit.scaled_activations(x, experts, e):
        if gram is not None:
            gram += a.T @ a
        cross += a.T @ (target[part] - predicted[part])
    system = fit.system or RidgeSystem(gram, ridge)
    if fit.system is None and keep.take(system.bytes):
        fit.system = system
    return system.solve(cross, (experts.down[e].float() - current).T).T.float()


def fit_layer(x: torch.Tensor, target: torch.Tensor, experts: Experts, route: Route,
              holdout: float = HOLDOUT_FRACTION,
              router_x: torch.Tensor | None = None) -> tuple[Experts, FitReport]:
    """Experts with down projections fitted on the first part of x [T, H] so the reduced
    layer reproduces target [T, H]; kept only if the held-out tokens agree. The report gives
    the held-out relative errors before and after. router_x [T, H]: what the router reads
    for each row of x, where it is not x (Gemma 4's)."""
    cut = max(1, int(x.shape[0] * (1 - holdout)))
    router_x = x if router_x is None else router_x
    down = fit_down(x[:cut], target[:cut], experts, _reading(route, router_x[:cut]))
    fitted = dataclasses.replace(experts, down=down.to(experts.down.dtype))
    held_x, held_y = x[cut:], target[cut:]
    held_route = _reading(route, router_x[cut:])
    before = relative_error(layer_output(held_x, experts, held_route), held_y)
    after = relative_error(layer_output(held_x, fitted, held_route), held_y)
    report = FitReport(before, after, after < before)
    return (fitted if report.fitted else experts), report


def _reading(route: Route, router_x: torch.Tensor) -> Route:
    """route on router_x, the router's reads of the rows it is handed (the same rows)."""
    return lambda rows: route(router_x)
