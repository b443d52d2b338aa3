"""The reduction methods by name, in one table: what `--method NAME` and `compare --methods`
mean as settings of the methods, and how options resolve to the reductions a run performs.

A recipe sets some fields on top of HC-SMoE's settings (BASE); a flag the user gives
overrides the recipe. `auto` tries several recipes per layer (AUTO_CANDIDATES) and keeps the
one whose reduced layer reproduces the original layer best on held-out calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

# HC-SMoE (Chen et al., ICML 2025): average-linkage hierarchical clustering of the experts'
# mean outputs, a frequency-weighted merge, the frequency-weighted average router row.
# saliency and similarity are REAM's (methods/ream.py); other kinds ignore them.
BASE = {"kind": "merge", "grouping": "hierarchical", "linkage": "average", "metric": "output",
        "merge": "freq", "router": "freq-avg", "prune_by": "frequency", "layer_fit": False,
        "max_group_size": None, "saliency": "ream", "similarity": "ream",
        "propagate": "original"}

# Per layer, the best of these (each layer-fitted): measured in docs/BENCHMARKS.md. msmoe-fit
# is not among them: on the trained bench model it never won a layer, and its neuron matching
# (a Hungarian assignment on an [F, F] cost matrix, on the CPU) cost more than the rest of the
# default at Mixtral's expert width ("The default's cost at real shapes").
AUTO_CANDIDATES = ("o-prune-fit", "f-prune-fit")

# name -> the fields it sets on top of BASE; auto names its candidates instead.
RECIPES: dict[str, dict] = {
    "auto": {"candidates": AUTO_CANDIDATES},
    "hc-smoe": {},
    "hc-smoe-single": {"linkage": "single"},
    "hc-smoe-complete": {"linkage": "complete"},
    "hc-smoe-ward": {"linkage": "ward"},
    "router-logits": {"metric": "router-logits"},
    "weights": {"metric": "weights"},
    "dominant": {"grouping": "dominant"},
    "kmeans": {"grouping": "kmeans"},
    "random": {"grouping": "random"},
    "average": {"merge": "average"},
    "fix-dom": {"merge": "fix-dom"},
    # M-SMoE's recipe: the most used experts lead, the rest join the one whose router logits
    # they resemble most; members are neuron-aligned before the frequency merge.
    "msmoe": {"grouping": "dominant", "metric": "router-logits", "merge": "msmoe"},
    "mergemoe": {"merge": "mergemoe"},
    "f-prune": {"kind": "prune", "prune_by": "frequency"},
    "o-prune": {"kind": "prune", "prune_by": "output"},
    # Prune, then compensate: the survivors' down projections refitted to the original layer.
    "f-prune-fit": {"kind": "prune", "prune_by": "frequency", "layer_fit": True},
    "o-prune-fit": {"kind": "prune", "prune_by": "output", "layer_fit": True},
    "msmoe-fit": {"grouping": "dominant", "metric": "router-logits", "merge": "msmoe",
                  "layer_fit": True},
    # REAM (arXiv 2604.04356) as its official code runs it (methods/ream.py): saliency leaders
    # in groups of up to C = 16, filled until every expert is taken; neurons matched to the
    # leader by activations and weight features, saliency-weighted merge; the leader's router
    # row; each layer calibrated on the already reduced layers before it.
    "ream": {"kind": "ream", "saliency": "ream", "similarity": "ream", "merge": "ream",
             "router": "leader", "max_group_size": 16, "propagate": "merged"},
    # hcconvert's earlier REAM: saliency from the model's own routing, two plain cosines,
    # groups of ceil(E / R) (every leader takes members), M-SMoE's alignment on the group's
    # tokens, the frequency-averaged router row.
    "ream-balanced": {"kind": "ream", "saliency": "routed", "similarity": "cosine",
                      "merge": "msmoe", "propagate": "merged"},
}
# The values --method took before it took every name: they keep working.
ALIASES = {"merge": "hc-smoe", "prune": "f-prune"}
METHOD_NAMES = (*RECIPES, *ALIASES)
# The fields a flag can override (None in ConvertOptions: the recipe's).
OVERRIDES = tuple(name for name in BASE if name != "kind")
# What `hcconvert compare` runs when --methods is not given.
DEFAULT_COMPARISON = ("auto", "o-prune-fit", "f-prune", "o-prune", "hc-smoe", "msmoe",
                      "mergemoe")


# REAM's settings in the model card's words.
SALIENCY_WORDS = {"ream": "REAM's saliency", "routed": "REAP's saliency from the model's routing"}
SIMILARITY_WORDS = {"ream": "REAM's similarity", "cosine": "cosine similarity"}


@dataclass(frozen=True)
class Reduction:
    """One reduction of a MoE layer, every setting resolved."""

    kind: str  # "merge" (group, then merge), "prune" (keep R experts) or "ream"
    grouping: str
    linkage: str
    metric: str
    merge: str
    router: str
    prune_by: str
    layer_fit: bool
    max_group_size: int | None  # REAM: C, its group size counting the leader (None: ceil(E/R))
    saliency: str  # REAM's leader choice and merge weights (ream.SALIENCIES)
    similarity: str  # REAM's expert similarity (ream.SIMILARITIES)

    @property
    def needs(self) -> frozenset[str]:
        """The optional layer statistics it reads (statistics.OPTIONAL_STATS)."""
        if self.kind == "prune":
            return frozenset({"saliency"} if self.prune_by == "output" else ())
        if self.kind == "ream":
            return frozenset({"ream" if self.saliency == "ream" else "saliency",
                              *(("ream",) if self.similarity == "ream"
                                else ("output", "router-logits"))})
        # Random grouping never looks at the features.
        return frozenset() if self.grouping == "random" else frozenset({self.metric})

    @property
    def merges(self) -> bool:
        """Whether it merges groups of experts (pruning keeps singletons)."""
        return self.kind != "prune"

    def describe(self) -> str:
        """One phrase naming it, for the model card."""
        fitted = ", then refitted to the original layer's output" if self.layer_fit else ""
        if self.kind == "ream":
            size = self.max_group_size or "ceil(E/R)"
            return (f"REAM (leaders by {SALIENCY_WORDS[self.saliency]}, groups of up to "
                    f"{size} filled by {SIMILARITY_WORDS[self.similarity]}, {self.merge} "
                    f"merge, {self.router} router)" + fitted)
        if self.kind == "prune":
            kept = ("the router picks most often (F-prune)" if self.prune_by == "frequency"
                    else "with the largest routed output (O-prune, REAP's saliency)")
            return f"pruning, keeping the experts {kept}{fitted}"
        how = (f"{self.linkage}-linkage hierarchical" if self.grouping == "hierarchical"
               else self.grouping)
        size = f", groups of at most {self.max_group_size}" if self.max_group_size else ""
        return (f"merging ({how} grouping of expert {self.metric} features{size}, "
                f"{self.merge} merge, {self.router} router){fitted}")


def recipe_name(method: str) -> str:
    """The table's name of a --method value (an alias's recipe)."""
    return ALIASES.get(method, method)


def settings(method: str, overrides: dict) -> dict:
    """Every field of BASE for one recipe, the given overrides (non-None) on top."""
    chosen = {**BASE, **RECIPES[recipe_name(method)]}
    chosen.pop("candidates", None)
    return {**chosen, **{k: v for k, v in overrides.items() if v is not None}}


def reductions(method: str, overrides: dict) -> dict[str, Reduction]:
    """The reductions a run tries per layer, by name: auto's candidates, or the one method."""
    candidates = RECIPES[recipe_name(method)].get("candidates", (recipe_name(method),))
    return {name: _reduction(settings(name, overrides)) for name in candidates}


def propagation(method: str, overrides: dict) -> str:
    """What feeds the next layer: the original layer's output, or the reduced one's."""
    return settings(method, overrides)["propagate"]


def _reduction(fields: dict) -> Reduction:
    return Reduction(**{k: v for k, v in fields.items() if k != "propagate"})
