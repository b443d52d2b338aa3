"""The files around the weights: edited config.json, hcconvert.json and a model card."""

from __future__ import annotations

import json
import platform
import shlex
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import UserError
from ..io.source import Checkpoint, is_hub_id
from ..io.writer import write_json
from .calibration import C4_FILE, C4_REPO, dataset_records, source_names
from .options import FIELD_NAMES, NOT_IN_RESULT, ConvertOptions, flag
from .records import RunRecord

if TYPE_CHECKING:
    from ..io.storage import Storage
    from ..model.families import Family
    from .records import Conversion

# Libraries whose versions can change the result, recorded in hcconvert.json.
RECORDED_LIBRARIES = ("torch", "safetensors", "transformers", "huggingface_hub", "tokenizers",
                      "numpy", "scipy", "triton")
# Model-card keys copied from the source's card: the reduction inherits its license.
LICENSE_KEYS = ("license", "license_name", "license_link")


def reduced_config(config: dict, family: Family, experts: int, top_k: int) -> dict:
    """config.json as JSON with only the expert count (and top-k where it must drop) changed.

    Every expert-count key the family knows is rewritten where present (a config may carry
    both the Hub's and transformers 5's name); routing keys such as n_group stay as they are.
    """
    out = dict(config)
    text = out  # where the keys are: config.json itself or a wrapper's text config
    if family.text_config_key is not None:
        text = out[family.text_config_key] = dict(family.text_config(config))
    for key in family.experts_keys:
        if key in text:
            text[key] = experts
    if top_k < family.top_k_of(text):  # checks.check_experts has said so
        for key in (family.top_k_key, *family.top_k_mirrors):
            if key in text:
                text[key] = top_k
    return out


def command_line(source: str, options: ConvertOptions, out: Path) -> str:
    """The command that repeats the run: every option that shapes the output and differs from
    its default, spelled as the command line spells it."""
    defaults = ConvertOptions(options.experts)
    extra = "".join(_flag(name, getattr(options, name)) for name in FIELD_NAMES
                    if name not in ("experts", *NOT_IN_RESULT)
                    and getattr(options, name) != getattr(defaults, name))
    return (f"hcconvert {shlex.quote(source)} --experts {options.experts}{extra} "
            f"--out {shlex.quote(out.name)}")


def _flag(name: str, value) -> str:
    """One option as the CLI spells it; booleans are --name / --no-name switches."""
    if isinstance(value, bool):
        return f" {flag(name)}" if value else f" --no-{flag(name)[2:]}"
    return f" {flag(name)} {shlex.quote(str(value))}"


def write_metadata(directory: Path, ckpt: Checkpoint, conversion: Conversion,
                   options: ConvertOptions, run: RunRecord | None = None) -> None:
    plan = conversion.plan
    config = reduced_config(ckpt.config, plan.spec.family, plan.experts_out, plan.top_k_out)
    write_json(directory / "config.json", plan.storage.output_config(config))
    layers = [{"layer": r.layer, "groups": r.groups, "frequencies": r.counts,
               "router_logit_mean": r.logit_mean, "tokens": r.tokens,
               # What --method auto chose and the fit's held-out errors, where they apply.
               **({"choice": r.choice} if r.choice else {}),
               **({"layer_fit": r.fit} if r.fit else {}),
               **({"candidates": r.candidates} if r.candidates else {}),
               **({"requantization": r.requantization} if r.requantization else {})}
              for r in conversion.layers]
    write_json(directory / "hcconvert.json", {
        "source": conversion.source,
        "method": options.method,
        "options": options.to_json(),
        "hcconvert_version": __version__,
        "environment": environment(),
        "run": asdict(run or RunRecord()),
        "calibration": calibration_used(conversion, options),
        "experts_before": plan.spec.num_experts,
        "experts_after": plan.experts_out,
        **({"quantization": quantization_used(plan.storage)} if plan.storage.fmt else {}),
        "layers": layers,
    })
    (directory / "README.md").write_text(model_card(conversion, options,
                                                    source_license(ckpt)))


def quantization_used(storage: Storage) -> dict:
    """The source's quantized storage and what the output wrote it as."""
    return {"method": storage.fmt.method, "quantized_weights": len(storage.bases),
            "written_as": "bf16" if storage.dense_output else storage.fmt.method}


def environment() -> dict:
    """Python, the platform and the versions of the libraries that shape the result."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "libraries": {name: _installed_version(name) for name in RECORDED_LIBRARIES}}


def _installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def calibration_used(conversion: Conversion, options: ConvertOptions) -> dict:
    """The calibration actually cut: fewer samples than asked when the text runs short (and
    one shorter sample when it holds less than one), from the tokens every MoE layer saw."""
    tokens = conversion.layers[0].tokens if conversion.layers else None
    samples = -(-tokens // options.seq_len) if tokens is not None else None
    datasets = dataset_records(options.calib)
    return {"text": options.calib or f"{C4_REPO}/{C4_FILE}", "samples": samples,
            "tokens": tokens, "seed": options.seed,
            # Each Hub dataset at the commit read: --recipe reads the same files again.
            **({"datasets": datasets} if datasets else {})}


def source_license(ckpt: Checkpoint) -> dict[str, str]:
    """The license keys of the source's model card front matter (README.md), else of its
    config.json; empty when neither says."""
    card = ckpt.files.read_text("README.md") or ""
    found = _front_matter(card)
    found = {k: found[k] for k in LICENSE_KEYS if k in found}
    if not found:
        found = {k: str(ckpt.config[k]) for k in LICENSE_KEYS if k in ckpt.config}
    return found


def _front_matter(card: str) -> dict[str, str]:
    """The one-line `key: value` entries of a model card's YAML front matter (lists and
    nested entries, which the license never is, are skipped)."""
    lines = card.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    entries = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and value.strip() and not line.startswith((" ", "-")):
            entries[key.strip()] = value.strip().strip("\"'")
    return entries


def model_card(conversion: Conversion, options: ConvertOptions,
               license_keys: dict[str, str] | None = None) -> str:
    plan = conversion.plan
    front = ["---", "library_name: transformers",
             *(f"{key}: {value}" for key, value in (license_keys or {}).items()),
             "tags:", "- moe", "- hc-smoe", "- hcconvert"]
    if is_hub_id(conversion.source):
        front.insert(1, f"base_model: {conversion.source}")
    groups = "\n".join(f"| {r.layer} | {json.dumps(r.groups)} |" for r in conversion.layers)
    return "\n".join(front + ["---", "", f"# {conversion.out.name}", "",
        f"`{conversion.source}` with its MoE layers reduced from {plan.spec.num_experts} to "
        f"{plan.experts_out} experts with hcconvert {__version__}, without retraining. "
        f"Method `{options.method}`: {options.describe()}.", "",
        "```", command_line(conversion.source, options, conversion.out), "```", "",
        calibration_details(conversion, options), "",
        "| layer | expert groups (original indices) |", "| --- | --- |", groups, ""])


def calibration_details(conversion: Conversion, options: ConvertOptions) -> str:
    used = calibration_used(conversion, options)
    text = source_names(options.calib) if options.calib else f"C4 (`{C4_REPO}` `{C4_FILE}`)"
    cut = (f"{used['samples']} samples ({used['tokens']} tokens)" if used["tokens"] is not None
           else f"{options.calib_samples} samples")
    return (f"Calibration: {cut} of up to {options.seq_len} tokens from {text}, "
            f"seed {options.seed}.")


EVALUATION_HEADING = "## Evaluation"


def record_evaluation(directory: Path, original: str, texts: list[str], numbers: dict) -> None:
    """An evaluation of the reduced checkpoint in directory against its original on the
    named texts: under "evaluation" in hcconvert.json and as the model card's last section
    (replacing any earlier one)."""
    record_path = directory / "hcconvert.json"
    if not record_path.is_file():
        raise UserError(f"{directory} has no hcconvert.json: not a checkpoint hcconvert wrote")
    record = json.loads(record_path.read_text())
    record["evaluation"] = {"original": original, "text": ",".join(texts), **numbers}
    write_json(record_path, record)
    card_path = directory / "README.md"
    card = card_path.read_text() if card_path.is_file() else ""
    kept = card.split("\n" + EVALUATION_HEADING)[0].rstrip("\n")
    card_path.write_text(f"{kept}\n\n{evaluation_section(original, texts, numbers)}")


def evaluation_section(original: str, texts: list[str], numbers: dict) -> str:
    named = ", ".join(f"`{text}`" for text in texts)
    return (f"{EVALUATION_HEADING}\n\nAgainst `{original}` on {named} "
            f"(`hcconvert eval`):\n\n{evaluation_table(numbers)}\n")


# The evaluation's rows: label, the score's key (and the original's own, shown beside it in
# brackets), format.
EVALUATION_ROWS = (
    ("held-out tokens", "tokens", None, "d"),
    ("perplexity (original)", "perplexity_original", None, ".4f"),
    ("perplexity (reduced)", "perplexity_reduced", None, ".4f"),
    ("KL(original ‖ reduced), nats/token", "kl", None, ".5f"),
    ("next-token top-1 agreement", "top1_agreement", None, ".4f"),
    ("greedy continuation: leading tokens equal to the original's", "greedy_match", None,
     ".2f"),
    ("repeated 4-grams per continuation (original's own)", "repetition",
     "repetition_original", ".4f"),
    ("distinct bigrams of the continuations (original's own)", "distinct",
     "distinct_original", ".4f"),
    ("the original's perplexity of the continuations (of its own)", "generated_perplexity",
     "generated_perplexity_original", ".3f"),
)


def evaluation_table(numbers: dict) -> str:
    """A markdown table of an evaluation's scores (Fidelity as a dict): one column, or with
    several texts one for all and one per text."""
    columns = {"all": numbers, **numbers["sources"]} if numbers.get("sources") else {"": numbers}
    rows = ["| | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for label, key, own, fmt in EVALUATION_ROWS:
        if numbers.get(key) is None:
            continue
        cells = [format(scores[key], fmt) + (f" ({format(scores[own], fmt)})" if own else "")
                 for scores in columns.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
