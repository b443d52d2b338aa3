"""One output checkpoint's part of a conversion: for each MoE layer, group the experts, merge
or prune them, reduce the router, and write the layer through the output's own ShardWriter.

Several reducers can share one pass over the layers (hcconvert compare): the pass collects each
layer's statistics once, for the union of what its reducers read (Reducer.needs).
E experts, R groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .alignment import NeuronMatcher
from .clustering import group_experts
from .experts import Experts
from .merging import merge_experts
from .options import ConvertOptions
from .plan import Plan
from .pruning import prune_groups, prune_scores
from .resources import StageTimer
from .router import reduce_router, reduce_router_bias
from .statistics import LayerStats, group_logsumexp_gram
from .writer import TORCH_DTYPES, ShardWriter


@dataclass
class LayerResult:
    layer: int
    groups: list[list[int]]
    counts: list[float]  # top-k selections per original expert
    logit_mean: list[float]  # mean router logit per original expert
    tokens: int


@dataclass
class Conversion:
    """What a conversion did, for hcconvert.json, the model card and the summary."""

    source: str
    out: Path
    plan: Plan
    layers: list[LayerResult] = field(default_factory=list)
    timer: StageTimer = field(default_factory=StageTimer)


class Reducer:
    """Reduces every MoE layer for one output, with that output's options."""

    def __init__(self, conversion: Conversion, options: ConvertOptions, writer: ShardWriter):
        self.conversion, self.options, self.writer = conversion, options, writer
        self.plan, self.spec, self.timer = conversion.plan, conversion.plan.spec, conversion.timer

    @property
    def needs(self) -> frozenset[str]:
        """The optional layer statistics this reduction reads (statistics.OPTIONAL_STATS)."""
        options = self.options
        if options.method == "prune":
            return frozenset({"saliency"} if options.prune_by == "output" else ())
        # Random grouping never looks at the features.
        return frozenset() if options.grouping == "random" else frozenset({options.metric})

    def write_globals(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors outside the decoder layers, copied as stored."""
        with self.timer.stage("write"):
            for tensor in self.plan.global_outputs:
                self.writer.write(tensor.name, tensors[tensor.name])

    def reduce(self, layer: int, router: dict[str, torch.Tensor], experts: Experts,
               x: torch.Tensor, stats: LayerStats, matcher: NeuronMatcher):
        """One MoE layer: the new router tensors (by their names below the layer) and experts
        (on the compute device), and the tensors to write (by full name, on the CPU).
        router: the router's weight and per-expert bias, by their names below the layer."""
        family = self.spec.family
        with self.timer.stage("compute"):
            weight = router[family.router]
            groups = self.choose_groups(stats)
            merged = merge_experts(experts, groups, stats.counts, self.options.merge, matcher)
            gram, cross = self.router_gram(x, weight, groups)
            reduced = {family.router: reduce_router(weight, groups, stats.counts,
                                                    self.options.router, gram, cross)}
            if family.router_bias is not None:
                reduced[family.router_bias] = reduce_router_bias(
                    router[family.router_bias], groups, stats.counts, self.options.router)
            self.conversion.layers.append(
                LayerResult(layer, groups, stats.counts.tolist(), stats.logit_mean.tolist(),
                            stats.tokens))
            produced = {name: t.to("cpu") for name, t in
                        self.merged_tensors(layer, reduced, merged).items()}
        return reduced, merged, produced

    def router_gram(self, x: torch.Tensor, router: torch.Tensor, groups: list[list[int]]):
        """lse-fit's normal equations; not needed when every group is a single expert."""
        if self.options.router != "lse-fit" or all(len(g) == 1 for g in groups):
            return None, None
        return group_logsumexp_gram(x, router, groups)

    def choose_groups(self, stats: LayerStats) -> list[list[int]]:
        """The expert groups. Under group-limited routing each routing group of experts is
        reduced on its own, to R/n_group experts, so every merged expert stays in its group."""
        count = self.spec.routing.groups.count if self.spec.routing.groups else 1
        size, keep = self.spec.num_experts // count, self.options.experts // count
        groups = []
        for start in range(0, self.spec.num_experts, size):
            local = self.group_slice(stats, slice(start, start + size), keep)
            groups += [[start + e for e in group] for group in local]
        return groups

    def group_slice(self, stats: LayerStats, members: slice, keep: int) -> list[list[int]]:
        options = self.options
        counts = stats.counts[members]
        if options.method == "prune":
            return prune_groups(prune_scores(stats, options.prune_by)[members], keep)
        if options.grouping == "random":
            features = np.zeros((len(counts), 1))  # random grouping ignores them
        else:
            features = stats.features(options.metric)[members].double().numpy()
        return group_experts(features, counts.numpy(), keep, grouping=options.grouping,
                             linkage=options.linkage, max_group_size=options.max_group_size,
                             seed=options.seed)

    def merged_tensors(self, layer: int, router: dict, merged: Experts) -> dict:
        """Reduced router and experts by full name, in the source's expert layout."""
        prefix = self.plan.layer_prefix(layer)
        tensors = {**router, **merged.to_layer(self.spec.family.experts)}
        return {prefix + name: tensor for name, tensor in tensors.items()}

    def write_layer(self, layer: int, raw: dict, produced: dict) -> None:
        """Write one layer's tensors in plan order: new ones, and the rest copied as stored."""
        prefix = self.plan.layer_prefix(layer)
        with self.timer.stage("write"):
            for tensor in self.plan.layer_outputs[layer]:
                value = produced.get(tensor.name)
                if value is None:
                    value = raw[tensor.name.removeprefix(prefix)]
                self.writer.write(tensor.name, value.to(TORCH_DTYPES[tensor.dtype]))
