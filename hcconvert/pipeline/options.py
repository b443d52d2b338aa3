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
from ..methods.ream import SALIENCIES, SIMILARITIES
from ..methods.router import ROUTERS
from .recipes import METHOD_NAMES, OVERRIDES, Reduction, propagation, reductions

PROPAGATIONS = ("original", "merged")
DEVICES = ("auto", "cpu", "cuda")
# auto: the checkpoint's half precision on a GPU and on a CPU with a matrix unit for it
# (AMX), float32 otherwise (decoder.compute_dtype).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# How quantized weights are written: as the source stores them, or dequantized in bf16.
DTYPES = ("source", "bf16")
# The options whose value must be one of a fixed set.
CHOICES = {"method": METHOD_NAMES, "metric": METRICS, "grouping": GROUPINGS,
           "linkage": LINKAGES, "merge": MERGES, "router": ROUTERS, "propagate": PROPAGATIONS,
           "prune_by": PRUNE_BY, "saliency": SALIENCIES, "similarity": SIMILARITIES,
           "device": DEVICES, "compute_dtype": COMPUTE_DTYPES, "dtype": DTYPES}
# Integer options and their least and greatest value: far beyond any real use, and within
# what torch's seeds and 64-bit sizes hold.
INTEGER_RANGES = {"experts": (1, 1 << 16), "calib_samples": (1, 1 << 20),
                  "seq_len": (1, 1 << 24), "seed": (0, (1 << 63) - 1),
                  "max_shard_size": (1, 1 << 62), "max_group_size": (1, 1 << 16),
                  "max_gpu_memory": (1, 1 << 62)}
TEXTS = ("calib", "revision", "text_field")
# Options that may be None: a recipe's setting (OVERRIDES), no calibration file (the default
# C4 shard), the model's sequence length, no revision, the GPU budget from the free memory
# (estimate.gpu_budget).
NULLABLE = (*OVERRIDES, "calib", "seq_len", "revision", "max_gpu_memory")
# Options given as sizes (5GB) on the command line and in recipes.
SIZES = ("max_shard_size", "max_gpu_memory")
# What decides the calibration hidden states: conversions that agree on these (and propagate
# the original outputs) can share one pass over the layers.
CALIBRATION_FIELDS = ("calib", "calib_samples", "seq_len", "seed", "device", "revision",
                      "compute_dtype", "text_field")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
DEFAULT_SHARD_SIZE = "5GB"
# The sequence length of the paper's calibration, where the model's context allows it.
DEFAULT_SEQ_LEN = 2048
# Options that are on or off.
SWITCHES = ("layer_fit",)


def flag(name: str) -> str:
    """An option's name as the command line spells it."""
    return "--" + name.replace("_", "-")


def _check_value(name: str, value) -> None:
    if value is None and name in NULLABLE:
        return
    if name in CHOICES and value not in CHOICES[name]:
        raise UserError(f"{flag(name)} {value!r} is not valid; choose from "
                        f"{', '.join(CHOICES[name])}")
    # bool is an int to Python, but seed=True is a mistake, not 1
    if name in INTEGER_RANGES:
        least, greatest = INTEGER_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"{flag(name)} {repr(value)[:40]} is not valid; it must be an "
                            f"integer of at least {least}")
        if value > greatest:
            raise UserError(f"{flag(name)} {repr(value)[:40]} is not valid; it must be an "
                            f"integer of at most {greatest}")
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
    # A name of recipes.RECIPES: per layer the best layer-fitted candidate by default, which
    # kept the most quality on every bench model and ratio (docs/BENCHMARKS.md).
    method: str = "auto"
    # Settings of the method's recipe, overridden where given; None: the recipe's (recipes.py).
    grouping: str | None = None
    linkage: str | None = None
    merge: str | None = None
    router: str | None = None
    propagate: str | None = None
    metric: str | None = None
    max_group_size: int | None = None
    prune_by: str | None = None
    # REAM's saliency and similarity: the official code's, or hcconvert's (methods/ream.py).
    saliency: str | None = None
    similarity: str | None = None
    # Refit the kept/merged experts' down projections so the reduced layer reproduces the
    # original layer's output on the calibration tokens (layerfit.py).
    layer_fit: bool | None = None
    calib: str | None = None
    calib_samples: int = 32
    # None: DEFAULT_SEQ_LEN, or the model's max_position_embeddings where that is shorter
    # (checks.for_model resolves it before any work).
    seq_len: int | None = None
    seed: int = 42
    max_shard_size: int = parse_size(DEFAULT_SHARD_SIZE)
    device: str = "auto"
    revision: str | None = None
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

    def overrides(self) -> dict:
        """The recipe settings given explicitly (None where the recipe decides)."""
        return {name: getattr(self, name) for name in OVERRIDES}

    def reductions(self) -> dict[str, Reduction]:
        """The reductions tried per layer, by name: auto's candidates, or the method alone."""
        return reductions(self.method, self.overrides())

    @property
    def propagates_merged(self) -> bool:
        """Whether the next layer is calibrated on the reduced layer's output (REAM's way)."""
        return propagation(self.method, self.overrides()) == "merged"

    @property
    def fits_layers(self) -> bool:
        """Whether a reduction refits the layer to the original layer's output."""
        return any(r.layer_fit for r in self.reductions().values())

    def describe(self) -> str:
        """The method as one phrase, for the model card."""
        found = self.reductions()
        if len(found) > 1:
            return (f"per layer, the best of {', '.join(found)} by held-out layer-output "
                    "error")
        return next(iter(found.values())).describe()


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ConvertOptions))
# Each option's default, for the CLI's defaults (experts has none).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConvertOptions)
            if f.default is not dataclasses.MISSING}
# The options that do not change the output's bytes (results do not depend on the budget).
NOT_IN_RESULT = ("max_gpu_memory",)


def read_recipe(path: Path) -> tuple[dict, str | None]:
    """The options of a recipe and the source it names, if any: an hcconvert.json written by
    a conversion (its "options" and "source"), or a JSON object of options such as
    {"experts": 4, "method": "o-prune"}. Values are checked when the ConvertOptions is built;
    the SIZES may be sizes such as "5GB"."""
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
    source = recipe.get("source") if "options" in recipe else None
    sizes = {name: size_option(options[name], name) for name in SIZES
             if isinstance(options.get(name), str)}
    return {**options, **sizes}, source if isinstance(source, str) else None


def size_option(text: str, name: str = "max_shard_size") -> int:
    """A size option (SIZES) as bytes; a malformed size is a UserError."""
    try:
        return parse_size(text)
    except (ValueError, OverflowError):
        raise UserError(f"{flag(name)} {text!r} is not a size like 5GB") from None
