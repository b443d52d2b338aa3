"""Several reductions of one checkpoint, each scored against the original on held-out text.

Reductions that share the calibration options and propagate the original outputs are converted
in one pass over the layers, so each layer's statistics are computed once for all of them
(convert_many); each output is then evaluated with the streamed perplexity and KL.
Serves `hcconvert compare` and the demo.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..model.spec import open_source
from ..pipeline.checks import plan_for
from ..pipeline.convert import convert_many
from ..pipeline.metadata import record_evaluation
from ..pipeline.options import ConvertOptions
from ..pipeline.records import Conversion
from .evaluate import Fidelity, evaluate_many


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


def compare(src: str, variants: dict[str, ConvertOptions], eval_text: Path, workdir: Path,
            seq_len: int = 512, samples: int = 64, device: str = "auto",
            progress: bool = False, overwrite: bool = True) -> list[Result]:
    """Convert SRC once per variant into workdir/<slug of its label>, sharing passes where
    possible, and evaluate each output against SRC. Results are in the variants' order."""
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
    for label, fidelity in zip(variants, fidelities, strict=True):
        record_evaluation(outs[label], src, eval_text, dataclasses.asdict(fidelity))
    return [Result(label, conversions[label], fidelity,
                   sum(conversions[label].timer.seconds.values()) / 60, eval_minutes)
            for label, fidelity in zip(variants, fidelities, strict=True)]


def markdown_table(results: list[Result]) -> str:
    """The results as a table; each method's own minutes, then the shared passes below it."""
    rows = ["| method | KL(orig ‖ reduced) | top-1 agreement | greedy match | perplexity | "
            "original perplexity | own minutes |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {r.label} | {r.fidelity.kl:.4f} | {r.fidelity.top1_agreement:.3f} | "
             f"{_greedy(r.fidelity)} | {r.fidelity.perplexity_reduced:.3f} | "
             f"{r.fidelity.perplexity_original:.3f} | {r.own_minutes:.2f} |" for r in results]
    shared = sorted({round(r.shared_minutes, 2) for r in results})
    rows += ["", f"shared calibration pass: {', '.join(f'{m:.2f}' for m in shared)} min; "
             f"evaluation: {sum(r.eval_minutes for r in results):.2f} min for all"]
    return "\n".join(rows)


def _greedy(fidelity: Fidelity) -> str:
    return "" if fidelity.greedy_match is None else f"{fidelity.greedy_match:.2f}"


def records(results: list[Result], kept: bool = True) -> list[dict]:
    """One flat record per result, for CSV and JSON; kept: the outputs stay where they were
    written (else their temporary directory is gone, and out is empty)."""
    return [{"method": r.label, "kl": r.fidelity.kl,
             "perplexity": r.fidelity.perplexity_reduced,
             "perplexity_original": r.fidelity.perplexity_original,
             "top1_agreement": r.fidelity.top1_agreement,
             "greedy_match": r.fidelity.greedy_match,
             "eval_tokens": r.fidelity.tokens, "experts": r.conversion.plan.experts_out,
             "convert_minutes": r.convert_minutes, "shared_minutes": r.shared_minutes,
             "own_minutes": r.own_minutes, "eval_minutes": r.eval_minutes,
             "minutes": r.minutes, "out": str(r.conversion.out) if kept else ""}
            for r in results]


def write_csv(results: list[Result], path: Path, kept: bool = True) -> None:
    rows = records(results, kept)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(results: list[Result], path: Path, kept: bool = True) -> None:
    path.write_text(json.dumps(records(results, kept), indent=2, ensure_ascii=False) + "\n")
