"""Several reductions of one checkpoint, each scored against the original on held-out text.

Reductions that share the calibration options and propagate the original outputs are converted
in one pass over the layers, so each layer's statistics are computed once for all of them
(convert_many); each output is then evaluated with the streamed perplexity and KL and its long
greedy continuations (evaluate.py), over all evaluation texts and, with several, per text.
Serves `hcconvert compare` and the demo.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..model.spec import open_source
from ..pipeline.checks import plan_for
from ..pipeline.convert import convert_many
from ..pipeline.metadata import record_evaluation
from ..pipeline.options import ConvertOptions
from ..pipeline.records import Conversion
from .evaluate import Fidelity, evaluate_many, source_names, text_paths


@dataclass(frozen=True)
class Result:
    label: str
    conversion: Conversion
    fidelity: Fidelity
    convert_minutes: float  # the shared pass plus this output's own reduction and writing
    eval_minutes: float

    @property
    def minutes(self) -> float:
        return self.convert_minutes + self.eval_minutes

    @property
    def shared_minutes(self) -> float:
        """The calibration pass this output shared with others (attention, statistics)."""
        return self.conversion.shared_seconds / 60

    @property
    def own_minutes(self) -> float:
        """This method's own reduction and writing, apart from the shared pass."""
        return self.convert_minutes - self.shared_minutes


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def named_variants(names: list[str], base: ConvertOptions) -> dict[str, ConvertOptions]:
    """The named methods (recipes.RECIPES) as options built on base: base's calibration
    options, and its recipe settings as overrides of each method's."""
    return {name: dataclasses.replace(base, method=name) for name in names}


def shared_passes(variants: dict[str, ConvertOptions]) -> list[list[str]]:
    """The labels grouped by the pass over the layers that can serve them: one per set of
    calibration options, and one of its own for each variant that propagates merged outputs."""
    passes: dict[tuple, list[str]] = {}
    for label, options in variants.items():
        key = (("merged", label) if options.propagates_merged
               else options.calibration_key())
        passes.setdefault(key, []).append(label)
    return list(passes.values())


def planned_bytes(src: str, variants: dict[str, ConvertOptions]) -> int:
    """The disk every output of the comparison will take, from the plans (headers only)."""
    ckpt, spec = open_source(src, next(iter(variants.values())).revision)
    return sum(plan_for(ckpt, spec, options)[1].bytes_out for options in variants.values())


def compare(src: str, variants: dict[str, ConvertOptions], eval_text: Path | Sequence[Path],
            workdir: Path, seq_len: int = 512, samples: int = 64, device: str = "auto",
            progress: bool = False, overwrite: bool = True) -> list[Result]:
    """Convert SRC once per variant into workdir/<slug of its label>, sharing passes where
    possible, and evaluate each output against SRC on `samples` sequences of each evaluation
    text. Results are in the variants' order."""
    outs = {label: workdir / slug(label) for label in variants}
    conversions: dict[str, Conversion] = {}
    for labels in shared_passes(variants):
        done = convert_many(src, [(outs[label], variants[label]) for label in labels],
                            overwrite=overwrite, progress=progress)
        conversions.update(zip(labels, done, strict=True))
    start = time.perf_counter()
    fidelities = evaluate_many(src, [str(outs[label]) for label in variants], eval_text,
                               seq_len=seq_len, samples=samples, device=device,
                               progress=progress)
    eval_minutes = (time.perf_counter() - start) / 60 / len(variants)  # one shared pass
    texts = source_names(text_paths(eval_text))
    for label, fidelity in zip(variants, fidelities, strict=True):
        record_evaluation(outs[label], src, texts, dataclasses.asdict(fidelity))
    return [Result(label, conversions[label], fidelity,
                   sum(conversions[label].timer.seconds.values()) / 60, eval_minutes)
            for label, fidelity in zip(variants, fidelities, strict=True)]


# compare's columns: header, the score's Fidelity field, its format; the original's own row
# shows the fields named in ORIGINAL_FIELDS instead.
COLUMNS = (("KL(orig ‖ reduced)", "kl", ".4f"), ("top-1 agreement", "top1_agreement", ".3f"),
           ("greedy match", "greedy_match", ".2f"), ("perplexity", "perplexity_reduced", ".3f"),
           ("repeated 4-grams", "repetition", ".3f"), ("distinct bigrams", "distinct", ".3f"),
           ("original's perplexity of its text", "generated_perplexity", ".3f"))
ORIGINAL_FIELDS = {"perplexity_reduced": "perplexity_original",
                   "repetition": "repetition_original", "distinct": "distinct_original",
                   "generated_perplexity": "generated_perplexity_original"}


def markdown_table(results: list[Result]) -> str:
    """The results as one table over all evaluation texts, then, with several, one per
    text; the original's own row first. Each method's own minutes, then the shared passes."""
    tables = [_table(results, None)]
    sources = results[0].fidelity.sources or {}
    tables += [f"### {name}\n\n{_table(results, name)}" for name in sources]
    shared = sorted({round(r.shared_minutes, 2) for r in results})
    return "\n\n".join(tables) + (
        f"\n\nshared calibration pass: {', '.join(f'{m:.2f}' for m in shared)} min; "
        f"evaluation: {sum(r.eval_minutes for r in results):.2f} min for all")


def _table(results: list[Result], source: str | None) -> str:
    header = ["method", *(name for name, _, _ in COLUMNS), "own minutes"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    first = _scores(results[0], source)
    rows.append("| (original) | " + " | ".join(
        _cell(first, ORIGINAL_FIELDS[field], fmt) if field in ORIGINAL_FIELDS else ""
        for _, field, fmt in COLUMNS) + " | |")
    for result in results:
        scores = _scores(result, source)
        rows.append(f"| {result.label} | "
                    + " | ".join(_cell(scores, field, fmt) for _, field, fmt in COLUMNS)
                    + f" | {result.own_minutes:.2f} |")
    return "\n".join(rows)


def _scores(result: Result, source: str | None) -> Fidelity:
    return result.fidelity if source is None else result.fidelity.sources[source]


def _cell(scores: Fidelity, field: str, fmt: str) -> str:
    value = getattr(scores, field)
    return "" if value is None else format(value, fmt)


# The records' names of Fidelity's fields where they differ.
RECORD_NAMES = {"tokens": "eval_tokens", "perplexity_reduced": "perplexity"}


def records(results: list[Result], kept: bool = True) -> list[dict]:
    """One flat record per result and evaluation text ("all" over every text), for CSV and
    JSON; kept: the outputs stay where they were written (else their temporary directory is
    gone, and out is empty)."""
    return [{"method": r.label, "source": source,
             **{RECORD_NAMES.get(k, k): v for k, v in dataclasses.asdict(scores).items()
                if k != "sources"},
             "experts": r.conversion.plan.experts_out,
             "convert_minutes": r.convert_minutes, "shared_minutes": r.shared_minutes,
             "own_minutes": r.own_minutes, "eval_minutes": r.eval_minutes,
             "minutes": r.minutes, "out": str(r.conversion.out) if kept else ""}
            for r in results
            for source, scores in {"all": r.fidelity, **(r.fidelity.sources or {})}.items()]


def write_csv(results: list[Result], path: Path, kept: bool = True) -> None:
    rows = records(results, kept)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(results: list[Result], path: Path, kept: bool = True) -> None:
    path.write_text(json.dumps(records(results, kept), indent=2, ensure_ascii=False) + "\n")
