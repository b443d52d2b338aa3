"""The files around the weights: edited config.json, hcconvert.json and a model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .options import ConvertOptions
from .source import Checkpoint, is_hub_id
from .writer import write_json

if TYPE_CHECKING:
    from .convert import Conversion
    from .families import Family

# The options that shape the result (not where or how it is written), in CLI order.
REDUCTION_FIELDS = ("calib", "calib_samples", "seq_len", "seed", "method", "metric", "grouping",
                    "linkage", "max_group_size", "merge", "prune_by", "router", "propagate",
                    "layer_fit")


def reduced_config(config: dict, family: Family, experts: int, top_k: int) -> dict:
    """config.json as JSON with only the expert count (and top-k where it must drop) changed.

    Every expert-count key the family knows is rewritten where present (a config may carry
    both the Hub's and transformers 5's name); routing keys such as n_group stay as they are.
    """
    out = dict(config)
    for key in family.experts_keys:
        if key in config:
            out[key] = experts
    if top_k < config[family.top_k_key]:
        print(f"warning: top-k drops from {config[family.top_k_key]} to {top_k} "
              f"(only {experts} experts remain)", file=sys.stderr)
        out[family.top_k_key] = top_k
    return out


def command_line(source: str, options: ConvertOptions, out: Path) -> str:
    """The command that repeats the reduction: the reduction options that differ from the
    defaults are spelled out."""
    defaults = ConvertOptions(options.experts)
    extra = "".join(_flag(name, getattr(options, name)) for name in REDUCTION_FIELDS
                    if getattr(options, name) != getattr(defaults, name))
    return f"hcconvert {source} --experts {options.experts}{extra} --out {out.name}"


def _flag(name: str, value) -> str:
    """One option as the CLI spells it; booleans are --name / --no-name switches."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f" --{flag}" if value else f" --no-{flag}"
    return f" --{flag} {value}"


def write_metadata(directory: Path, ckpt: Checkpoint, conversion: Conversion,
                   options: ConvertOptions) -> None:
    plan = conversion.plan
    config = reduced_config(ckpt.config, plan.spec.family, plan.experts_out, plan.top_k_out)
    write_json(directory / "config.json", config)
    layers = [{"layer": r.layer, "groups": r.groups, "frequencies": r.counts,
               "router_logit_mean": r.logit_mean, "tokens": r.tokens,
               # What --method auto chose and the fit's held-out errors, where they apply.
               **({"choice": r.choice} if r.choice else {}),
               **({"layer_fit": r.fit} if r.fit else {})} for r in conversion.layers]
    write_json(directory / "hcconvert.json", {
        "source": conversion.source,
        "method": options.method,
        "options": options.to_json(),
        "experts_before": plan.spec.num_experts,
        "experts_after": plan.experts_out,
        "layers": layers,
    })
    (directory / "README.md").write_text(model_card(conversion, options))


def model_card(conversion: Conversion, options: ConvertOptions) -> str:
    plan = conversion.plan
    hub_source = is_hub_id(conversion.source)
    front = ["---", "library_name: transformers", "tags:", "- moe", "- hc-smoe", "- hcconvert"]
    if hub_source:
        front.insert(1, f"base_model: {conversion.source}")
    groups = "\n".join(f"| {r.layer} | {json.dumps(r.groups)} |" for r in conversion.layers)
    return "\n".join(front + ["---", "", f"# {conversion.out.name}", "",
        f"`{conversion.source}` with its MoE layers reduced from {plan.spec.num_experts} to "
        f"{plan.experts_out} experts by {options.describe()} with "
        "hcconvert, without retraining.", "",
        "```", command_line(conversion.source, options, conversion.out), "```", "",
        "| layer | expert groups (original indices) |", "| --- | --- |", groups, ""])
