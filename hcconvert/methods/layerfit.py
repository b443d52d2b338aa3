"""Fit a reduced MoE layer to the ORIGINAL layer's output ("reduce, then compensate").

Whatever a reduction keeps or merges, the reduced layer (new router, new top-k routing, kept
and merged experts) should reproduce what the original layer's routed experts computed on the
calibration tokens. With the reduced layer's routing held fixed, its output
    ŷ_t = Σ_k w_{t,k} · (down_{i(t,k)} a_{i(t,k)}(x_t) + b_{i(t,k)}),
    a_i(x) = silu(gate_i x) ⊙ (up_i x) (or the family's activation; b: down's bias, if any)
is linear in every expert's down projection, so block coordinate descent solves it exactly one
expert at a time: for expert r, with the others fixed, the tokens routed to r must supply the
residual y_t − ŷ_t + (r's current contribution), a ridge least-squares problem in down_r
(lstsq.py: fp32 Cholesky). The ridge pulls towards the unfitted down projection, so directions
calibration never excites stay as they were. A few rounds settle the tokens that two fitted
experts share. An expert with fewer routed tokens n than neurons F (a reduced calibration, or
Mixtral's F = 14336) is solved in the dual form, where each change to its down projection is
AᵀC: its rounds cost n²H instead of nFH, and F enters only in forming A, AAᵀ and, once, the
fitted projection.

The calibration tokens are split: the fit sees the first part, the rest is held out. The ridge
is chosen per layer on the held-out tokens from RIDGES, and the fitted weights are kept only
where they lower the held-out error; with too few tokens per expert the fit is not tried
(MIN_FIT_TOKENS): it would chase noise, and the held-out guard would only reject it.

Everything here works on plain tensors; the routing arrives as a callable, so families that
route differently (sigmoid scores, groups) plug in their own.
T tokens, H hidden, F expert ffn, R experts of the reduced layer, K top-k, n an expert's tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.experts import Experts
from .lstsq import RidgeSystem, gram_matrix, rounded_product, wide_product

# route(x [T, H]) -> (weights [T, K], index [T, K]): a layer's routing rule, router included
# (transformers' own router of the family, with the layer's reduced router tensors).
Route = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Share of the calibration tokens held out to choose the ridge and check that the fit
# generalises.
HOLDOUT_FRACTION = 0.25
# Coordinate-descent sweeps over the experts: after two, the shared tokens barely move (the
# held-out error changes in the fourth digit on the bench models); one alone left the trained
# Mixtral-shaped bench model at KL 0.105 instead of 0.099 (8 -> 4; a layer's held-out error
# 0.030 instead of 0.023), so the second round stays despite its quarter of the fit's cost.
ROUNDS = 2
# The ridges tried per layer, relative to the mean diagonal of each expert's AᵀA (lstsq.py);
# the one with the lowest held-out error is kept. A constant ridge overfitted small calibrations
# and under-fitted large ones (docs/BENCHMARKS.md, "The fit at every calibration size"). 1e-3
# was tried too and chosen in none of 56 fits on the trained bench models (8k to 65k tokens,
# up to 48 fit tokens per neuron; a real model's wider experts get fewer, wanting larger ridges).
RIDGES = (1e-2, 1e-1, 1.0)
# Fit tokens per neuron (per kept expert, n / F) below which the largest ridge is tried right
# after the middle one, above which the smallest is. The best ridge grows as the tokens per
# neuron fall (docs/DESIGN.md: the largest in 37 of 48 fits at 9, the smallest or the middle
# one in 188 of 192 at 36 to 144), and the held-out error is unimodal in the ridge (in 286 of
# 288 fits), so when the second ridge beats the middle one the third is not tried.
RIDGE_TOKENS_PER_NEURON = 25
# Fit tokens per kept expert below which the fit is not tried: on the trained bench model
# (F = 512) the fit raised the held-out error in half the candidates at 192 and 384 tokens
# per kept expert, in 1 of 8 at 768, in none at 1536 (docs/BENCHMARKS.md, "The fit at every
# calibration size"); the held-out check is itself noisy at so few tokens.
MIN_FIT_TOKENS = 512
CHUNK_TOKENS = 8192
# Bytes the fit may keep of its experts' activations (in the compute dtype) between rounds and
# ridges; beyond it an expert recomputes them from its tokens, twice a round (the Gram
# matrices are always kept: the choice of ridge reuses them). A Mixtral layer's four kept
# experts hold 2.8 GB in bf16 at the default calibration; at 1 GiB, recomputing the rest was
# 40 % of the fit's products there (pipeline/cost.py).
FIT_KEEP_BYTES = 4 << 30
# Where the best ridge's state waits while the next is made, by the device the fit runs on:
# a GPU's on the host.
PARKING = {"cuda": torch.device("cpu")}


@dataclass(frozen=True)
class FitReport:
    """Relative held-out error ||ŷ − y||² / ||y||² of the layer before and after the fit."""

    error_before: float
    error_after: float | None  # None: the fit was not tried
    fitted: bool  # whether the fitted weights were kept (they lowered the held-out error)
    ridge: float | None = None  # the relative ridge chosen on the held-out tokens
    skipped: str | None = None  # why the fit was not tried

    @property
    def error(self) -> float:
        return self.error_after if self.fitted else self.error_before

    def to_json(self) -> dict:
        found = {"error_unfitted": self.error_before, "error_fitted": self.error_after,
                 "fitted": self.fitted, "ridge": self.ridge}
        return {**found, "skipped": self.skipped} if self.skipped else found


def relative_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return ((predicted - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)).item()


class _Routed:
    """One expert's routed tokens and their routing weights (fixed: the routing is), and its
    scaled activations A = weight × a(x) [n, F] in the compute dtype (x's: what the reduced
    model computes them in), kept when the budget allows."""

    def __init__(self, e: int, weights: torch.Tensor, index: torch.Tensor):
        self.e = e
        self.token, slot = torch.where(index == e)
        self.gate_weight = weights[self.token, slot].float()
        self.kept: torch.Tensor | None = None

    def activations(self, x: torch.Tensor, experts: Experts, at: int):
        """(token chunk, A on it) in turn, kept or computed alike (the same sums either way)."""
        for start in range(0, self.token.numel(), CHUNK_TOKENS):
            part = self.token[start:start + CHUNK_TOKENS]
            if self.kept is not None:
                yield part, self.kept[start:start + CHUNK_TOKENS]
                continue
            yield part, (experts.hidden(x[part], at)
                         * self.gate_weight[start:start + CHUNK_TOKENS, None].to(x.dtype))

    def keep(self, x: torch.Tensor, experts: Experts, at: int, budget: list[int],
             always: bool = False) -> None:
        """Keep A whole, always or if it fits in what is left of budget (a one-element list
        of bytes, which it then takes)."""
        nbytes = self.token.numel() * experts.up.shape[1] * x.element_size()
        if always or nbytes <= budget[0]:
            self.kept = torch.cat([a for _, a in self.activations(x, experts, at)])
            budget[0] -= 0 if always else nbytes

    def add_output(self, out: torch.Tensor, x, experts: Experts, at: int, down: torch.Tensor,
                   bias: torch.Tensor | None = None) -> None:
        """out[tokens] += A downᵀ (+ the routed bias): the expert's routed output (or its
        change), each token's rounded to the compute dtype as the reduced model computes it."""
        for part, scaled in self.activations(x, experts, at):
            out.index_add_(0, part, rounded_product(scaled, down.T).float())
        if bias is not None:
            out.index_add_(0, self.token, self.gate_weight[:, None] * bias.float())


def _routed(weights: torch.Tensor, index: torch.Tensor) -> dict[int, _Routed]:
    """Each expert some token picked ([T, K] each), with its routed tokens."""
    return {e: _Routed(e, weights, index) for e in index.unique().tolist()}


def _routed_sum(x, experts: Experts, routed: dict[int, _Routed]) -> torch.Tensor:
    """[T, H] fp32 Σ_k weights[t, k] · expert index[t, k] (x_t) over routed."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for chunk, places in experts.chunks(list(routed)):
        for e, at in places:
            bias = chunk.down_bias[at] if chunk.down_bias is not None else None
            routed[e].add_output(out, x, chunk, at, chunk.down[at], bias)
    return out


def layer_output(x: torch.Tensor, experts: Experts, route: Route) -> torch.Tensor:
    """[T, H] fp32 routed-expert output of a layer on tokens x [T, H]."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device)
    for start in range(0, x.shape[0], CHUNK_TOKENS):
        chunk = x[start:start + CHUNK_TOKENS]
        out[start:start + CHUNK_TOKENS] = _routed_sum(chunk, experts, _routed(*route(chunk)))
    return out


def _times(matrix: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """matrix @ change, skipped while change is still zero: every ridge's first round starts
    from the unfitted weights, and the product is an [m, m] by [m, H] one."""
    return matrix @ change if change.any() else torch.zeros_like(change)


def dual_form(tokens: int, ffn: int) -> bool:
    """Whether an expert with this many fit tokens is solved in the dual form."""
    return tokens < ffn


class _Primal:
    """Expert e's fit with at least as many routed tokens n as neurons F: AᵀA [F, F] is formed
    once over token chunks, and the state is the change D [F, H] to its down projection
    (transposed). A is kept within the budget, else recomputed each round."""

    def __init__(self, x, experts: Experts, at: int, routed: _Routed, budget: list[int]):
        routed.keep(x, experts, at, budget)
        activations = (a for _, a in routed.activations(x, experts, at))
        self.system = RidgeSystem(gram_matrix(activations, experts.up.shape[1], x.device))

    def start(self, hidden: int) -> torch.Tensor:
        return torch.zeros(self.system.gram.shape[0], hidden, device=self.system.gram.device)

    def step(self, x, experts: Experts, at: int, routed: _Routed, change: torch.Tensor,
             residual: torch.Tensor, ridge: float, predicted: torch.Tensor) -> torch.Tensor:
        """The change minimising ||A D − (residual + A change)||² + λ||D||², with predicted
        (the layer's output) updated by A (D − change)."""
        rhs = _times(self.system.gram, change)
        for part, a in routed.activations(x, experts, at):
            rhs += wide_product(a.T, residual[torch.searchsorted(routed.token, part)])
        solved = self.system.solve(rhs, ridge)
        routed.add_output(predicted, x, experts, at, (solved - change).T)
        return solved

    def add_held_out(self, out, held: _Routed, x, experts: Experts, at: int,
                     change: torch.Tensor) -> None:
        held.add_output(out, x, experts, at, change.T)

    def change(self, change: torch.Tensor) -> torch.Tensor:
        """The change to the down projection [H, F]."""
        return change.T


class _Dual:
    """Expert e's fit with fewer routed tokens n than neurons F: every change to its down
    projection is AᵀC for coefficients C [n, H] (the dual solution), so a round works on
    AAᵀ [n, n] and [n, H] matrices only and never on F; A [n, F] is kept to form the down
    projection once, at the end, and the held-out tokens' K = A_held Aᵀ [n_held, n] once."""

    def __init__(self, x, experts: Experts, at: int, routed: _Routed, budget: list[int]):
        routed.keep(x, experts, at, budget, always=True)
        self.a = routed.kept
        self.system = RidgeSystem(gram_matrix([self.a.T], self.a.shape[0], x.device),
                                  unknowns=experts.up.shape[1])
        self.held: torch.Tensor | None = None

    def start(self, hidden: int) -> torch.Tensor:
        return torch.zeros(self.a.shape[0], hidden, device=self.a.device)

    def step(self, x, experts: Experts, at: int, routed: _Routed, coefficients: torch.Tensor,
             residual: torch.Tensor, ridge: float, predicted: torch.Tensor) -> torch.Tensor:
        """C' = (AAᵀ + λI)⁻¹ (residual + AAᵀ C), the dual of _Primal.step; predicted gains
        AAᵀ (C' − C) on the expert's tokens."""
        gram = self.system.gram
        solved = self.system.solve(residual + _times(gram, coefficients), ridge)
        predicted.index_add_(0, routed.token, gram @ (solved - coefficients))
        return solved

    def add_held_out(self, out, held: _Routed, x, experts: Experts, at: int,
                     coefficients: torch.Tensor) -> None:
        if self.held is None:
            self.held = torch.cat([wide_product(a, self.a.T)
                                   for _, a in held.activations(x, experts, at)])
        out.index_add_(0, held.token, self.held @ coefficients)

    def change(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The change to the down projection [H, F], CᵀA."""
        return rounded_product(coefficients.T.to(self.a.dtype), self.a)


def fit_down(x: torch.Tensor, target: torch.Tensor, experts: Experts, route: Route,
             rounds: int = ROUNDS, ridge: float = RIDGES[0]) -> torch.Tensor:
    """[R, H, F] fp32 down projections (kept where the experts are) that make the reduced
    layer (its experts, routing fixed by route) reproduce target [T, H] on x [T, H]; ridge
    towards experts.down, relative to each Gram matrix's mean diagonal."""
    fit = _DownFit(x, target, experts, _routed(*route(x)))
    return fit.down(fit.solve(ridge, rounds))


@dataclass
class _FitState:
    """Where block coordinate descent stands: each expert's change (D or C) and the layer's
    output with them on the fit tokens."""

    changes: dict[int, torch.Tensor]
    predicted: torch.Tensor

    def copy(self, device: torch.device | None = None) -> _FitState:
        """A copy, on device (default: where it is)."""
        def copied(t: torch.Tensor) -> torch.Tensor:
            return t.to(device or t.device, copy=True)
        return _FitState({e: copied(c) for e, c in self.changes.items()}, copied(self.predicted))


class _DownFit:
    """The normal equations of every routed expert, formed once for all ridges and rounds."""

    def __init__(self, x, target, experts: Experts, routed: dict[int, _Routed]):
        self.x, self.target, self.experts, self.routed = x, target, experts, routed
        budget = [FIT_KEEP_BYTES]
        self.systems = {e: (_Dual if dual_form(routed[e].token.numel(), experts.up.shape[1])
                            else _Primal)(x, chunk, at, routed[e], budget)
                        for chunk, places in experts.chunks(list(routed)) for e, at in places}
        self.unfitted = _routed_sum(x, experts, routed)  # the layer's output as reduced

    def solve(self, ridge: float, rounds: int = ROUNDS,
              start: _FitState | None = None) -> _FitState:
        """Block coordinate descent at one ridge, from the unfitted layer or from start (which
        it updates)."""
        state = start or _FitState({e: s.start(self.x.shape[1]) for e, s in self.systems.items()},
                                   self.unfitted.clone())
        for _ in range(rounds):
            for chunk, places in self.experts.chunks(list(self.routed)):
                for e, at in places:
                    routed = self.routed[e]
                    residual = self.target[routed.token] - state.predicted[routed.token]
                    state.changes[e] = self.systems[e].step(
                        self.x, chunk, at, routed, state.changes[e], residual, ridge,
                        state.predicted)
        return state

    def held_out(self, x: torch.Tensor, held: dict[int, _Routed], unfitted: torch.Tensor,
                 state: _FitState) -> torch.Tensor:
        """The fitted layer's output on held-out tokens x, from their unfitted output."""
        out = unfitted.clone()
        for chunk, places in self.experts.chunks([e for e in held if e in self.systems]):
            for e, at in places:
                self.systems[e].add_held_out(out, held[e], x, chunk, at, state.changes[e])
        return out

    def down(self, state: _FitState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[R, H, F] down projections of the state in dtype (unchanged where no token went),
        each change added in place: fp32 copies of the layer's (0.9 GB at Mixtral's width)
        cost seconds of fresh pages."""
        down = self.experts.down.to(dtype, copy=True)
        for e, system in self.systems.items():
            down[e] += system.change(state.changes[e].to(self.x.device)).to(down.device)
        return down


def fit_layer(x: torch.Tensor, target: torch.Tensor, experts: Experts, route: Route,
              holdout: float = HOLDOUT_FRACTION,
              router_x: torch.Tensor | None = None) -> tuple[Experts, FitReport]:
    """Experts with down projections fitted on the first part of x [T, H] so the reduced
    layer reproduces target [T, H], at the ridge of RIDGES that the held-out tokens prefer;
    kept only if it lowers their error. The report gives the held-out errors. router_x
    [T, H]: what the router reads for each row of x, where it is not x (Gemma 4's)."""
    cut = max(1, int(x.shape[0] * (1 - holdout)))
    router_x = x if router_x is None else router_x
    held_x, held_y = x[cut:], target[cut:]
    held = _routed(*route(router_x[cut:]))
    budget = [FIT_KEEP_BYTES]  # each ridge's held-out output reuses the activations
    for chunk, places in experts.chunks(list(held)):
        for e, at in places:
            held[e].keep(held_x, chunk, at, budget)
    held_unfitted = _routed_sum(held_x, experts, held)
    before = relative_error(held_unfitted, held_y)
    weights, index = route(router_x[:cut])
    per_expert = fit_tokens_per_expert(x.shape[0], index.shape[1], len(experts), holdout)
    if per_expert < MIN_FIT_TOKENS:
        return experts, FitReport(before, None, False, skipped=(
            f"{per_expert} fit tokens per kept expert, fewer than {MIN_FIT_TOKENS}"))
    fit = _DownFit(x[:cut], target[:cut], experts, _routed(weights, index))

    def held_out_error(state: _FitState) -> float:
        return relative_error(fit.held_out(held_x, held, held_unfitted, state), held_y)

    # The ridge is chosen after one round (the later rounds move the held-out error in its
    # third digit, not the ranking of ridges: docs/BENCHMARKS.md), in ridge_order, the third
    # only where the second did not beat the middle one; only the chosen one goes on. Off the
    # CPU the best state waits on the host while the next is made (a state is each kept
    # expert's [F, H] change: 7.5 GB for DeepSeek-V3), so one at a time is on the GPU.
    park = PARKING.get(x.device.type)
    order = ridge_order(per_expert / experts.up.shape[1])
    best = None
    for ridge in order:
        if best is not None and best[1] != order[0]:
            break  # the second ridge beat the middle one: the third lies beyond the middle
        state = fit.solve(ridge, rounds=1)
        error = held_out_error(state)
        if best is None or error < best[0]:
            best = None  # the earlier best goes before its successor is copied
            best = error, ridge, state if park is None else state.copy(park)
        del state  # before the next ridge's is made
    error, ridge, state = best
    if ROUNDS > 1:
        more = fit.solve(ridge, ROUNDS - 1, start=state.copy(x.device))
        error, state = min((error, state), (held_out_error(more), more), key=lambda p: p[0])
    report = FitReport(before, error, error < before, ridge)
    if not report.fitted:
        return experts, report
    return dataclasses.replace(experts, down=fit.down(state, experts.down.dtype)), report


def largest_ridge_second(tokens_per_neuron: float) -> bool:
    """Whether this many fit tokens per neuron favour the largest ridge over the smallest."""
    return tokens_per_neuron < RIDGE_TOKENS_PER_NEURON


def ridge_order(tokens_per_neuron: float) -> tuple[float, float, float]:
    """RIDGES in the order fit_layer tries them: the middle one, then the one on the side
    that this many fit tokens per neuron favours, then the other."""
    small, middle, large = RIDGES
    if largest_ridge_second(tokens_per_neuron):
        return middle, large, small
    return middle, small, large


def fit_tokens_per_expert(tokens: int, top_k: int, kept: int,
                          holdout: float = HOLDOUT_FRACTION) -> int:
    """Routed fit tokens per kept expert, on average, from `tokens` calibration tokens."""
    return max(1, int(tokens * (1 - holdout))) * top_k // kept


def fit_state_bytes(tokens: int, top_k: int, experts: int, ffn: int, hidden: int) -> int:
    """One state of the fit: each kept expert's change ([F, H] in the primal form, [n, H] in
    the dual, fp32; their rows bounded by the routed slots) and the layer's prediction."""
    fit_tokens = int(tokens * (1 - HOLDOUT_FRACTION))
    return 4 * (min(fit_tokens * top_k, experts * ffn) + fit_tokens) * hidden


def fit_bytes(tokens: int, top_k: int, experts: int, ffn: int, hidden: int,
              element: int, parked: bool = False) -> int:
    """The most fit_layer holds for a layer fitted on `tokens` calibration tokens routed
    top_k over `experts` experts of `ffn` neurons, however unevenly they are routed: the
    Gram matrices (an expert's n tokens give min(n, F)² entries, n summing to the routed
    slots), one factorisation, the fp32 down projections fitted and the prior they start
    from, two states (the best ridge's and the one being made; one where the best is parked
    on the host, as off the CPU), and the activations in the compute dtype (element bytes
    each: an expert in the dual form keeps its [n, F], one in the primal form within
    FIT_KEEP_BYTES, the held-out tokens' within it too)."""
    fit_tokens = int(tokens * (1 - HOLDOUT_FRACTION))
    slots, largest = fit_tokens * top_k, min(fit_tokens, ffn)
    grams = min(slots * largest, experts * ffn * ffn)
    kept = min(slots * ffn, FIT_KEEP_BYTES // element + experts * ffn * ffn)
    held_out = min((tokens - fit_tokens) * top_k * ffn, FIT_KEEP_BYTES // element)
    down = 2 * experts * hidden * ffn
    states = (1 if parked else 2) * fit_state_bytes(tokens, top_k, experts, ffn, hidden)
    return 4 * (grams + largest * largest + down) + states + element * (kept + held_out)
