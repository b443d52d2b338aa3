"""How long a conversion will take, estimated before any weight is read (--dry-run prints it;
docs/BENCHMARKS.md checks it against measured runs).

Per layer, each phase's work is counted from the shapes and the options: products (FLOPs, in
the compute dtype or in fp32), Cholesky factorisations, neuron matchings, and bytes copied or
read; the device's rates for each are measured once per process by timing small examples
(about a third of a second), or given for a device that is not here (bench/estimate_models.py
projects an H100 and a 24 GB workstation GPU from their published rates).
T tokens, S sequence, H hidden, F expert ffn, E experts, R kept, K top-k, n an expert's tokens.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..methods import layerfit, lstsq
from ..model.spec import ModelSpec
from .options import ConvertOptions

# Seconds the process spends before its first layer: the imports of torch and transformers,
# the model's skeleton, the calibration text (measured on the bench machine).
START_SECONDS = 8.0
# The layer fit does its work at about 0.6 of the rates timed here on square products:
# skinny products, row gathers, a Python loop over the experts (measured over estimated
# seconds 1.5 to 1.8 on the Mixtral-, Qwen3- and DeepSeek-shaped bench layers on the CPU,
# docs/BENCHMARKS.md).
FIT_EFFICIENCY = 0.6


@dataclass(frozen=True)
class Rates:
    """What a device does per second."""

    products: float  # FLOP/s of large products in the compute dtype
    fp32_products: float  # FLOP/s of large fp32 products (the fit's solves, on a CPU its Gram
    # matrices too; the matching)
    factorisations: float  # FLOP/s of an fp32 Cholesky factorisation (n³/3 FLOPs)
    copies: float  # bytes/s of a copy with a dtype change (stacking, merging, gathers)
    reads: float  # bytes/s of weights read from the checkpoint
    # Seconds of one dense Hungarian matching of n neurons is matching · n³ (scipy's LAPJV on
    # correlation matrices; docs/BENCHMARKS.md measures it at Mixtral's F).
    matching: float
    # The share of these rates the layer fit reaches (FIT_EFFICIENCY where they are timed;
    # rates projected from a device's peak are derated already).
    fit_efficiency: float = 1.0


@dataclass
class Work:
    """One phase's work."""

    products: float = 0.0  # FLOPs in the compute dtype
    fp32_products: float = 0.0
    factorisations: float = 0.0  # FLOPs
    copies: float = 0.0  # bytes
    reads: float = 0.0  # bytes
    matchings: list[int] = field(default_factory=list)  # neurons of each dense matching
    fit: bool = False  # the layer fit's: at the rates' fit_efficiency

    def seconds(self, rates: Rates) -> float:
        seconds = (self.products / rates.products + self.fp32_products / rates.fp32_products
                   + self.factorisations / rates.factorisations + self.copies / rates.copies
                   + self.reads / rates.reads
                   + sum(rates.matching * n ** 3 for n in self.matchings))
        return seconds / rates.fit_efficiency if self.fit else seconds


def _timed(run, repeats: int = 3) -> float:
    """The fastest of a few runs of run(), in seconds (the first warms up)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_rates(device: torch.device, dtype: torch.dtype) -> Rates:
    """This machine's rates, from small examples timed on the device (once per process)."""
    # A GPU reaches its rates only on larger examples: at 1024 a product or a factorisation
    # there is mostly launch latency (cuSOLVER factored 4096² in 2.4 ms on an L40S). A CPU's
    # products are at their rate at 1024 already.
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    half = a.to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def product(x):
        return lambda: (x @ x, sync())

    spd = a @ a.T + n * torch.eye(n, device=device)
    # weights are read on the host; the copies the phases count (merges, the fit's gathers)
    # run where the compute does
    big = torch.empty(32 * 2**20, dtype=torch.bfloat16)
    on_device = big.to(device)
    cost = np.random.default_rng(0).random((256, 256))
    return Rates(
        products=2 * n**3 / _timed(product(half)),
        fp32_products=2 * n**3 / _timed(product(a)),
        factorisations=n**3 / 3 / _timed(lambda: (torch.linalg.cholesky(spd), sync())),
        copies=big.numel() * 2 / _timed(lambda: (on_device.float(), sync())),
        reads=big.numel() * 2 / _timed(lambda: big.clone()),
        matching=_timed(lambda: linear_sum_assignment(cost)) / 256**3,
        fit_efficiency=FIT_EFFICIENCY)


def moe_layer_work(spec: ModelSpec, options: ConvertOptions, element: int,
                   gpu: bool) -> dict[str, Work]:
    """Each phase's work in one MoE layer; element: bytes per weight in the compute dtype;
    gpu: the statistics run as their own kernel (on the CPU the forward sums them)."""
    tokens = options.calib_samples * options.seq_len
    hidden, ffn, experts = spec.hidden, spec.ffn, spec.num_experts
    expert_values = 3 * hidden * ffn
    routed = 2 * tokens * spec.top_k * expert_values
    every = 4 * tokens * experts * hidden * ffn  # every expert's gate and up on every token
    needs = frozenset().union(*(r.needs for r in options.reductions().values()))
    sums = every if "output" in needs else 0
    attention = 2 * tokens * 4 * hidden * hidden + 2 * tokens * options.seq_len * hidden
    if sums and not gpu:  # the summing forward reuses the routed tokens' gate and up products
        routed //= 3
    work = {"read": Work(reads=experts * expert_values * element),
            "forward": Work(products=attention + routed + (0 if gpu else sums),
                            # the experts stacked in the compute dtype
                            copies=experts * expert_values * element),
            "statistics": Work(products=sums if gpu else 0)}
    for name, reduction in options.reductions().items():
        work[f"reduce {name}"] = _reduce_work(spec, options, reduction, tokens)
        if reduction.layer_fit:
            work[f"fit {name}"] = _fit_work(spec, options.experts, tokens, element, gpu)
    return work


def _reduce_work(spec: ModelSpec, options: ConvertOptions, reduction, tokens: int) -> Work:
    """Grouping is cheap; a merge averages the members (fp32), an aligned merge first matches
    each member's neurons to its group's dominant (correlations over the group's tokens)."""
    hidden, ffn, experts = spec.hidden, spec.ffn, spec.num_experts
    work = Work(copies=experts * 3 * hidden * ffn * 8 if reduction.merges else 0)
    if reduction.merges and reduction.merge in ("msmoe", "mergemoe", "fix-dom"):
        members = experts - options.experts  # each non-dominant member is matched once
        group_tokens = tokens * spec.top_k * 2 // experts  # a pair's routed tokens
        work.fp32_products += members * (2 * group_tokens * ffn * ffn
                                         + 8 * group_tokens * hidden * ffn)
        if reduction.merge == "msmoe" or reduction.merge == "mergemoe":
            work.matchings = [ffn] * members
    return work


def _fit_work(spec: ModelSpec, kept: int, tokens: int, element: int, gpu: bool) -> Work:
    """The layer fit (layerfit.py), each kept expert with n routed fit tokens: its activations
    A and Gram matrix once (AᵀA in the primal form, n ≥ F; AAᵀ in the dual; only its blocks
    on and below the diagonal are multiplied), then a round of solves at every ridge and the
    chosen ridge's further rounds, each ridge's held-out output.
    A is computed in the compute dtype (element bytes per value), and so are the products
    whose results are rounded anyway (outputs, the fitted projection: lstsq.rounded_product);
    the others with A (the Gram matrix, Aᵀr) run there too on a GPU (fp32 accumulation), in
    fp32 on the CPU (lstsq.wide_product); the solves and the Gram matrix's own products in
    fp32, the Gram matrix times the change only once there is one (after a ridge's first
    round). The dual form's rounds never touch F; the primal form recomputes the activations
    it could not keep (FIT_KEEP_BYTES) in every round."""
    hidden, ffn, top_k = spec.hidden, spec.ffn, min(spec.top_k, kept)
    n = max(1, layerfit.fit_tokens_per_expert(tokens, top_k, kept))
    held = max(1, tokens * top_k // kept - n)
    activations = 4 * hidden * ffn  # per token: gate and up
    output = 2 * ffn * hidden  # per token, an expert's output from A
    if n < layerfit.MIN_FIT_TOKENS:
        # the fit is not tried: the held-out tokens' unfitted error alone
        return Work(products=kept * held * (activations + output), fit=True)
    # rounds of solves per expert: one at each ridge tried, then the chosen ridge's further
    # ones. With few fit tokens per neuron the largest ridge is tried second and mostly wins,
    # so the third is not tried (37 of 48 fits at 9 tokens per neuron, 24 of 48 at 18:
    # docs/DESIGN.md); with many the middle one wins most, and all three are tried.
    ridges = 2 if layerfit.largest_ridge_second(n / ffn) else len(layerfit.RIDGES)
    later = layerfit.ROUNDS - 1
    size = min(n, ffn)  # the system's: AAᵀ or AᵀA
    solve = 2 * size * size * hidden  # two triangular solves against H columns
    steps = ridges + later
    evaluations = ridges + min(later, 1)  # held-out errors: each ridge's, the later rounds'
    rounded = (n + held) * output  # the reduced layer's output before the fit
    if layerfit.dual_form(n, ffn):
        computed = (n + held) * activations
        wide = lstsq.gram_flops(ffn, n) + 2 * held * n * ffn  # AAᵀ and K = A_held Aᵀ
        rounded += n * output  # the fitted projection, AᵀC
        # AAᵀ C in every step, K C in every evaluation
        fp32 = steps * 2 * n * n * hidden + evaluations * 2 * held * n * hidden
    else:
        # A not kept is recomputed for the unfitted output and twice in every step (for Aᵀr,
        # then for A ΔD)
        unkept = 1 - min(1.0, layerfit.FIT_KEEP_BYTES / (kept * n * ffn * element))
        computed = (n + held + unkept * n * (1 + 2 * steps)) * activations
        wide = lstsq.gram_flops(n, ffn) + steps * n * output  # AᵀA, Aᵀr
        rounded += steps * n * output + evaluations * held * output  # A ΔD, held-out outputs
        fp32 = 0.0
    # each step gathers its tokens' target and prediction rows, forms the residual and adds
    # the update back: about five copies of an [n, H] fp32 matrix (10 bytes moved per value),
    # many small experts' main cost beside their products; in the copies rate's bytes, each
    # of which moves three (one read, two written)
    moved = steps * 10 * n * hidden * 4 // 3
    return Work(copies=kept * moved,
                products=kept * (computed + rounded + (wide if gpu else 0)),
                fp32_products=kept * (steps * solve + later * solve + fp32
                                      + (0 if gpu else wide)),
                factorisations=kept * steps * size**3 / 3, fit=True)


def layer_seconds(spec: ModelSpec, options: ConvertOptions, rates: Rates, element: int,
                  gpu: bool) -> dict[str, float]:
    """Each phase's estimated seconds in one MoE layer."""
    return {phase: work.seconds(rates)
            for phase, work in moe_layer_work(spec, options, element, gpu).items()}


def last_write_work(spec: ModelSpec, options: ConvertOptions, element: int) -> Work:
    """Writing the last layer's kept experts (each layer's write overlaps the next layer's
    compute, the last one's does not): cast to the stored dtype, then written."""
    values = options.experts * 3 * spec.hidden * spec.ffn
    return Work(copies=values * (element + 2), reads=values * 2)


def run_seconds(spec: ModelSpec, options: ConvertOptions, rates: Rates, element: int,
                gpu: bool, layers: int) -> float:
    """The whole conversion: the start, the reduced layers, the last layer's write (dense
    layers are small beside them)."""
    return (START_SECONDS + last_write_work(spec, options, element).seconds(rates)
            + layers * sum(layer_seconds(spec, options, rates, element, gpu).values()))
