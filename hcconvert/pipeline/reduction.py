"""One output checkpoint's part of a conversion: for each MoE layer, group the experts, merge
or prune them, reduce the router, and write the layer through the output's own ShardWriter.

Several reducers can share one pass over the layers (hcconvert compare): the pass collects each
layer's statistics once, for the union of what its reducers read (Reducer.needs).
E experts, R groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..io.tensors import TORCH_DTYPES
from ..io.writer import ShardWriter
from ..methods.alignment import NeuronMatcher
from ..methods.clustering import group_experts
from ..methods.layerfit import FitReport, Route, fit_layer
from ..methods.merging import merge_experts
from ..methods.pruning import prune_groups, prune_scores
from ..methods.ream import cosine_distance, floored, official_distance, pseudo_groups
from ..methods.router import reduce_router, reduce_router_bias
from ..methods.statistics import LayerStats, group_logsumexp_gram
from ..model.experts import Experts
from ..model.layouts import ExpertLayout, PerExpert
from .options import ConvertOptions
from .plan import stored_layout
from .recipes import Reduction
from .records import Conversion, LayerResult


@dataclass
class Reduced:
    """One candidate reduction of a layer."""

    groups: list[list[int]]
    router: dict[str, torch.Tensor]  # weight [R, H] and any per-expert bias, by name
    experts: Experts
    fit: FitReport | None = None


# routing(router tensors by their names below the layer, expert count) -> that layer's routing
# rule, computed by transformers' own MoE block (LayerPipeline.routing).
Routing = Callable[[dict[str, torch.Tensor], int], Route]


def group_slice(reduction: Reduction, seed: int, layer: int, stats: LayerStats,
                members: slice, keep: int) -> list[list[int]]:
    """Groups of the experts in members (indices local to the slice)."""
    counts = stats.counts[members]
    if reduction.kind == "prune":
        return prune_groups(prune_scores(stats, reduction.prune_by)[members], keep)
    if reduction.kind == "ream":
        saliency = ream_saliency(reduction, stats)[members]
        size = reduction.max_group_size or math.ceil(len(saliency) / keep)
        return pseudo_groups(saliency, ream_distance(reduction, stats)[members, members],
                             keep, size)
    if reduction.grouping == "random":
        features = np.zeros((len(counts), 1))  # random grouping ignores them
    else:
        features = stats.features(reduction.metric)[members].double().numpy()
    # A seed per layer: one seed for all would draw the same random partition in every layer.
    return group_experts(features, counts.numpy(), keep, grouping=reduction.grouping,
                         linkage=reduction.linkage, max_group_size=reduction.max_group_size,
                         seed=seed + layer)


def ream_saliency(reduction: Reduction, stats: LayerStats) -> torch.Tensor:
    """[E] what leads a REAM group and weighs its merge: the official code's saliency with
    its zero floor, or REAP's from the model's own routing."""
    return floored(stats.ream.saliency) if reduction.saliency == "ream" else stats.saliency


def ream_distance(reduction: Reduction, stats: LayerStats) -> np.ndarray:
    """[E, E] REAM's expert distances: the official similarity's, or hcconvert's cosines."""
    if reduction.similarity == "ream":
        return official_distance(stats.ream)
    return cosine_distance(stats.output_mean, stats.router_features)


class Reducer:
    """Reduces every MoE layer for one output, with that output's options."""

    def __init__(self, conversion: Conversion, options: ConvertOptions, writer: ShardWriter):
        self.conversion, self.options, self.writer = conversion, options, writer
        self.plan, self.spec, self.timer = conversion.plan, conversion.plan.spec, conversion.timer
        # The reductions tried per layer (auto's candidates, each layer-fitted), by name.
        self.candidates = options.reductions()

    @property
    def needs(self) -> frozenset[str]:
        """The optional layer statistics this output reads (statistics.OPTIONAL_STATS)."""
        return frozenset().union(*(r.needs for r in self.candidates.values()))

    def write_globals(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors outside the decoder layers, copied (as stored, or dequantized with
        --dtype bf16)."""
        with self.timer.stage("write"):
            for tensor in self.plan.global_outputs:
                self.writer.write(tensor.name, self.plan.storage.copied_value(tensor.name,
                                                                              tensors))

    def reduce(self, layer: int, stored: Mapping[str, torch.Tensor],
               router: dict[str, torch.Tensor], experts: Experts, x: torch.Tensor,
               stats: LayerStats, matcher: NeuronMatcher, routing: Routing,
               target: torch.Tensor | None = None, router_x: torch.Tensor | None = None):
        """One MoE layer: the new router tensors (by their names below the layer) and experts
        (on the compute device), and the tensors to write (by full name, on the CPU).
        stored: the layer's tensors as stored, by their names below the layer;
        router: the router's weight and per-expert bias, by their names below the layer;
        target: the original layer's routed-expert output on x, for the layer fit;
        router_x: what the router read for each row of x, where it is not x (Gemma 4's)."""
        router_x = x if router_x is None else router_x
        choice, best, tried = self.best_reduction(layer, experts, x, router, stats, matcher,
                                                  routing, target, router_x)
        with self.timer.stage("requantize" if layer in self.plan.requantized else "reduce"):
            produced, requantization = self.stored_tensors(layer, best, experts, stored)
            self.conversion.layers.append(
                LayerResult(layer, best.groups, stats.counts.tolist(),
                            stats.logit_mean.tolist(), stats.tokens,
                            choice if len(self.candidates) > 1 else None,
                            best.fit.to_json() if best.fit else None, requantization,
                            tried if len(self.candidates) > 1 else None))
        return best.router, best.experts, produced

    @property
    def fits_layers(self) -> bool:
        """Whether some candidate refits the layer to the original's output (the pipeline
        then keeps that output from its forward)."""
        return self.options.fits_layers

    def best_reduction(self, layer: int, experts: Experts, x: torch.Tensor, router: dict,
                       stats: LayerStats, matcher: NeuronMatcher, routing: Routing,
                       target: torch.Tensor | None,
                       router_x: torch.Tensor) -> tuple[str, Reduced, dict]:
        """The candidate whose reduced layer reproduces the original's output best on the
        held-out calibration tokens (the only candidate, without --method auto), and each
        candidate's held-out errors by name."""
        best, seen, tried = None, [], {}
        for name, reduction in self.candidates.items():
            with self.timer.stage(f"reduce {name}"):
                groups = self.choose_groups(reduction, layer, stats)
            same = _same_reduction(reduction, groups, seen)
            if same is not None:  # auto's pruning candidates often keep the same experts
                tried[name] = {**tried[same], "same_as": same}
                continue
            seen.append((name, reduction, groups))
            reduced = self.reduce_with(name, reduction, groups, experts, x, router, target,
                                       stats, matcher, routing, router_x)
            tried[name] = reduced.fit.to_json() if reduced.fit else {}
            if best is None or reduced.fit.error < best[1].fit.error:
                best = name, reduced  # only the best so far stays in memory
        return (*best, tried)

    def reduce_with(self, name: str, reduction: Reduction, groups: list[list[int]],
                    experts: Experts, x: torch.Tensor, router: dict,
                    target: torch.Tensor | None, stats: LayerStats, matcher: NeuronMatcher,
                    routing: Routing, router_x: torch.Tensor) -> Reduced:
        """One candidate reduction of the layer with its groups: merged experts, router, and
        with layer_fit the down projections refitted to the original layer's output target."""
        family = self.spec.family
        with self.timer.stage(f"reduce {name}"):
            # REAM merges by saliency: its leader is the most salient member.
            weights = (ream_saliency(reduction, stats) if reduction.kind == "ream"
                       else stats.counts)
            merged = merge_experts(experts, groups, weights, reduction.merge, matcher)
            weight = router[family.router]
            gram, cross = self.router_gram(reduction, router_x, weight, groups)
            reduced = {family.router: reduce_router(weight, groups, stats.counts,
                                                    reduction.router, gram, cross)}
            if family.router_bias is not None:
                reduced[family.router_bias] = reduce_router_bias(
                    router[family.router_bias], groups, stats.counts, reduction.router)
        if not reduction.layer_fit:
            return Reduced(groups, reduced, merged)
        if target is None:
            raise ValueError("the layer fit needs the original layer's output")
        with self.timer.stage(f"fit {name}"):
            fitted, report = fit_layer(x, target, merged, routing(reduced, len(groups)),
                                       router_x=router_x)
        return Reduced(groups, reduced, fitted, report)

    def router_gram(self, reduction: Reduction, x: torch.Tensor, router: torch.Tensor,
                    groups: list[list[int]]):
        """lse-fit's normal equations; not needed when every group is a single expert."""
        if reduction.router != "lse-fit" or all(len(g) == 1 for g in groups):
            return None, None
        return group_logsumexp_gram(x, router, groups)

    def choose_groups(self, reduction: Reduction, layer: int,
                      stats: LayerStats) -> list[list[int]]:
        """The expert groups. Under group-limited routing each routing group of experts is
        reduced on its own, to R/n_group experts, so every merged expert stays in its group."""
        count = self.spec.routing.groups.count if self.spec.routing.groups else 1
        size, keep = self.spec.num_experts // count, self.options.experts // count
        groups = []
        for start in range(0, self.spec.num_experts, size):
            local = group_slice(reduction, self.options.seed, layer, stats,
                                slice(start, start + size), keep)
            groups += [[start + e for e in group] for group in local]
        return groups

    def stored_tensors(self, layer: int, reduced: Reduced, original: Experts,
                       stored: Mapping[str, torch.Tensor]) -> tuple[dict, dict | None]:
        """Reduced router and experts to write, by full name, on the CPU, in the source's
        expert layout; where the plan writes them quantized, in the source's format (plus the
        requantization error, else None)."""
        prefix = self.plan.layer_prefix(layer)
        layout = stored_layout(self.spec, layer, self.plan.layer_names[layer])
        router = {prefix + name: tensor for name, tensor in reduced.router.items()}
        experts = {prefix + name: tensor
                   for name, tensor in reduced.experts.to_layer(layout).items()}
        requantization = None
        if layer in self.plan.requantized:
            unchanged = unchanged_weights(layout, reduced.groups, reduced.experts, original,
                                          prefix)
            experts, errors = self.plan.storage.requantize(experts, unchanged, stored, prefix)
            requantization = requantization_record(errors, len(unchanged))
        return {name: t.to("cpu") for name, t in {**router, **experts}.items()}, requantization

    def write_layer(self, layer: int, raw: dict, produced: dict) -> None:
        """Write one layer's tensors in plan order: new ones, and the rest copied (as stored,
        or dequantized with --dtype bf16)."""
        prefix = self.plan.layer_prefix(layer)
        with self.timer.stage("write"):
            for tensor in self.plan.layer_outputs[layer]:
                value = produced.get(tensor.name)
                if value is None:
                    value = self.plan.storage.copied_value(tensor.name, raw, prefix)
                self.writer.write(tensor.name, value.to(TORCH_DTYPES[tensor.dtype]))


def _same_reduction(reduction: Reduction, groups: list[list[int]],
                    seen: list[tuple[str, Reduction, list[list[int]]]]) -> str | None:
    """The candidate tried already that gives this one's reduced layer, if any: the same
    groups, and either all of them single experts (kept as they are, with their router rows,
    by any merge and router rule) or the same rules."""
    def rules(r: Reduction) -> tuple:
        return r.kind, r.merge, r.router
    singletons = all(len(group) == 1 for group in groups)
    return next((name for name, other, before in seen
                 if groups == before and reduction.layer_fit == other.layer_fit
                 and (singletons or rules(reduction) == rules(other))), None)


def unchanged_weights(layout: ExpertLayout, groups: list[list[int]], merged: Experts,
                      original: Experts, prefix: str) -> dict[str, str]:
    """The new expert weights equal to a source expert's (a kept expert's, a singleton
    group's, where no fit changed it): full name -> the source weight's. Those are copied as
    stored, since requantizing a weight that went through the compute dtype need not give its
    bytes back. Fused experts are one tensor for all: never unchanged."""
    if not isinstance(layout, PerExpert):
        return {}
    found = {}
    for new, group in enumerate(groups):
        if len(group) != 1:
            continue
        for (template, after), (_, before) in zip(layout.names.stacked(merged),
                                                  layout.names.stacked(original), strict=True):
            if torch.equal(after[new], before[group[0]]):
                found[prefix + template.format(expert=new)] = \
                    prefix + template.format(expert=group[0])
    return found


def requantization_record(errors: list[float], copied: int) -> dict:
    """hcconvert.json's account of one layer's quantized experts: how many weights were
    requantized and their relative Frobenius errors, how many copied as stored."""
    return {"requantized": len(errors), "copied": copied,
            "error_mean": float(np.mean(errors)) if errors else 0.0,
            "error_max": max(errors, default=0.0)}
