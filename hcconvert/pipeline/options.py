"""Every conversion option in one frozen object; the CLI and the Python API both build it.

The object checks its own values, so a misspelt method through the Python API fails the way
it does on the command line: one line naming the option and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..methods.clustering import GROUPINGS, LINKAGES
from ..methods.features import METRICS
from ..methods.merging import MERGES
from ..methods.pruning import PRUNE_BY
from ..methods.router import ROUTERS

METHODS = ("merge", "prune", "ream", "auto")
PROPAGATIONS = ("original", "merged")
DEVICES = ("auto", "cpu", "cuda")
# auto: the checkpoint's half precision on a GPU and on a CPU with a matrix unit for it
# (AMX), float32 otherwise (decoder.compute_dtype).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# How quantized weights are written: as the source stores them, or dequantized in bf16.
DTYPES = ("source", "bf16")
# The options whose value must be one of a fixed set.
CHOICES = {"method": METHODS, "metric": METRICS, "grouping": GROUPINGS, "linkage": LINKAGES,
           "merge": MERGES, "router": ROUTERS, "propagate": PROPAGATIONS,
           "prune_by": PRUNE_BY, "device": DEVICES, "compute_dtype": COMPUTE_DTYPES,
           "dtype": DTYPES}
# Integer options and their least value.
MINIMUMS = {"experts": 1, "calib_samples": 1, "seq_len": 1, "seed": 0, "max_shard_size": 1,
            "max_group_size": 1, "max_gpu_memory": 1}
TEXTS = ("calib", "revision", "text_field")
# Options that may be None: no calibration file (the default C4 shard), no revision, no limit,
# the GPU budget from the free memory (estimate.gpu_budget).
NULLABLE = ("calib", "revision", "max_group_size", "max_gpu_memory")
# Options given as sizes (5GB) on the command line and in recipes.
SIZES = ("max_shard_size", "max_gpu_memory")
# What decides the calibration hidden states: conversions that agree on these (and propagate
# the original outputs) can share one pass over the layers.
CALIBRATION_FIELDS = ("calib", "calib_samples", "seq_len", "seed", "device", "revision",
                      "compute_dtype", "text_field")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
DEFAULT_SHARD_SIZE = "5GB"


def flag(name: str) -> str:
    """An option's name as the command line spells it."""
    return "--" + name.replace("_", "-")

# Options that are on or off.
SWITCHES = ("layer_fit",)


def _check_value(name: str, value) -> None:
    if value is None and name in NULLABLE:
        return
    if name in CHOICES and value not in CHOICES[name]:
        raise UserError(f"{flag(name)} {value!r} is not valid; choose from "
                        f"{', '.join(CHOICES[name])}")
    # bool is an int to Python, but seed=True is a mistake, not 1
    if name in MINIMUMS and (not isinstance(value, int) or isinstance(value, bool)
                             or value < MINIMUMS[name]):
        raise UserError(f"{flag(name)} {value!r} is not valid; it must be an integer of at "
                        f"least {MINIMUMS[name]}")
    if name in TEXTS and not isinstance(value, str):
        raise UserError(f"{flag(name)} {value!r} is not valid; it must be text")
    if name in SWITCHES and not isinstance(value, bool):
        raise UserError(f"{flag(name)} {value!r} is not valid; it must be true or false")


def parse_size(text: str) -> int:
    """Bytes in a size such as 5GB, 500MB or 1000000."""
    upper = text.strip().upper()
    for unit, factor in SIZE_UNITS.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


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
    max_shard_size: int = parse_size(DEFAULT_SHARD_SIZE)
    device: str = "auto"
    revision: str | None = None
    metric: str = "output"
    max_group_size: int | None = None
    prune_by: str = "frequency"
    # Refit the kept/merged experts' down projections so the reduced layer reproduces the
    # original layer's output on the calibration tokens (layerfit.py).
    layer_fit: bool = False
    # The dtype of the layers' products (sums and statistics accumulate in fp32 whatever it is).
    compute_dtype: str = "auto"
    # The field of JSON calibration lines that holds the text (chat lines: "messages").
    text_field: str = "text"
    # A quantized source's weights in the output: its format (merged experts requantized with
    # fresh scales), or with "bf16" all dequantized and config.json's quantization_config
    # dropped (storage.py).
    dtype: str = "source"
    # GPU bytes a MoE layer may use: its experts are brought there in chunks that fit
    # (estimate.layer_budget). None: the free memory less a margin on CUDA, no limit on the
    # CPU. The results do not depend on it.
    max_gpu_memory: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.calib, os.PathLike):  # a Path from the Python API; JSON needs str
            object.__setattr__(self, "calib", os.fspath(self.calib))
        for field in dataclasses.fields(self):
            _check_value(field.name, getattr(self, field.name))

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


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ConvertOptions))
# Each option's default, for the CLI's defaults (experts has none).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConvertOptions)
            if f.default is not dataclasses.MISSING}


def read_recipe(path: Path) -> dict:
    """The options of a recipe: an hcconvert.json written by a conversion (its "options"), or
    a JSON object of options such as {"experts": 4, "method": "prune"}. Values are checked
    when the ConvertOptions is built; the SIZES may be sizes such as "5GB"."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read recipe {path}: {err}") from None
    options = recipe.get("options", recipe) if isinstance(recipe, dict) else None
    if not isinstance(options, dict):
        raise UserError(f"recipe {path} is not a JSON object of options")
    unknown = sorted(set(options) - set(FIELD_NAMES))
    if unknown:
        raise UserError(f"recipe {path}: unknown option {unknown[0]!r}; options are "
                        f"{', '.join(FIELD_NAMES)}")
    return {**options, **{name: size_option(options[name], name) for name in SIZES
                          if isinstance(options.get(name), str)}}


def size_option(text: str, name: str = "max_shard_size") -> int:
    """A size option (SIZES) as bytes; a malformed size is a UserError."""
    try:
        return parse_size(text)
    except (ValueError, OverflowError):
        raise UserError(f"{flag(name)} {text!r} is not a size like 5GB") from None


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
