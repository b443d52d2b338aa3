"""Every conversion option in one frozen object; the CLI and the Python API both build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METHODS = ("merge", "prune", "ream", "auto")
METRICS = ("output", "router-logits", "weights")
ROUTERS = ("dominant", "freq-avg", "lse-fit")
MERGES = ("freq", "average", "fix-dom", "msmoe", "mergemoe")
PRUNE_BY = ("frequency", "output")
PROPAGATIONS = ("original", "merged")
DEVICES = ("auto", "cpu", "cuda")
# What decides the calibration hidden states: conversions that agree on these (and propagate
# the original outputs) can share one pass over the layers.
CALIBRATION_FIELDS = ("calib", "calib_samples", "seq_len", "seed", "device", "revision")


@dataclass(frozen=True)
class ConvertOptions:
    experts: int
    # Per layer the best layer-fitted candidate: it kept the most quality on every bench model
    # and ratio (docs/BENCHMARKS.md, "Beating REAP").
    method: str = "auto"
    grouping: str = "hierarchical"
    linkage: str = "average"
    merge: str = "freq"
    router: str = "freq-avg"  # measured best on trained models: docs/BENCHMARKS.md
    propagate: str = "original"
    calib: str | None = None
    calib_samples: int = 32
    seq_len: int = 2048
    seed: int = 42
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    revision: str | None = None
    metric: str = "output"
    max_group_size: int | None = None
    prune_by: str = "frequency"
    # Refit the kept/merged experts' down projections so the reduced layer reproduces the
    # original layer's output on the calibration tokens (layerfit.py).
    layer_fit: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def calibration_key(self) -> tuple:
        return tuple(getattr(self, name) for name in CALIBRATION_FIELDS)

    def describe(self) -> str:
        """One phrase naming the reduction, for the model card."""
        if self.layer_fit:
            return self._reduction().rstrip(",") + ", then refitted to the original layer's output,"
        return self._reduction()

    def _reduction(self) -> str:
        if self.method == "auto":
            return ("per layer, the best of " + ", ".join(AUTO_CANDIDATES) +
                    " by held-out layer-output error,")
        if self.method == "ream":
            return f"REAM (REAP-saliency leaders, {self.merge} merge, {self.router} router)"
        if self.method == "prune":
            kept = ("the router picks most often (F-prune)" if self.prune_by == "frequency"
                    else "with the largest routed output (O-prune, REAP's saliency)")
            return f"pruning, keeping the experts {kept},"
        how = f"{self.linkage}-linkage hierarchical" if self.grouping == "hierarchical" \
            else self.grouping
        size = f", groups of at most {self.max_group_size}" if self.max_group_size else ""
        return (f"merging ({how} grouping of expert {self.metric} features{size}, "
                f"{self.merge} merge, {self.router} router)")


# HC-SMoE, the paper's recipe: ConvertOptions' defaults (average-linkage clustering of expert
# outputs, frequency merge, freq-avg router) with merging in place of the default method.
HC_SMOE = {"method": "merge"}
# The reductions `hcconvert compare` knows by name: HC-SMoE with these fields changed (named()).
NAMED_METHODS: dict[str, dict] = {
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
    "f-prune": {"method": "prune", "prune_by": "frequency"},
    "o-prune": {"method": "prune", "prune_by": "output"},
    # Prune, then compensate: the survivors' down projections refitted to the original layer.
    "f-prune-fit": {"method": "prune", "prune_by": "frequency", "layer_fit": True},
    "o-prune-fit": {"method": "prune", "prune_by": "output", "layer_fit": True},
    "msmoe-fit": {"grouping": "dominant", "metric": "router-logits", "merge": "msmoe",
                  "layer_fit": True},
    # REAM (arXiv 2604.04356): REAP-saliency leaders, aligned merge, calibrated on the
    # already reduced layers before it (ream.py).
    "ream": {"method": "ream", "merge": "msmoe", "propagate": "merged"},
    # Per layer, the candidate (AUTO_CANDIDATES, each layer-fitted) whose reduced layer
    # reproduces the original layer's output best on held-out calibration tokens.
    "auto": {"method": "auto"},
}
AUTO_CANDIDATES = ("o-prune-fit", "f-prune-fit", "msmoe-fit")


def named(name: str) -> dict:
    """The fields a named method sets on top of the caller's options."""
    return {**HC_SMOE, **NAMED_METHODS[name]}
DEFAULT_COMPARISON = ("auto", "o-prune-fit", "f-prune", "o-prune", "hc-smoe", "msmoe",
                      "mergemoe")
