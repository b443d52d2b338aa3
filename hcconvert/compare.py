"""Several reductions of one checkpoint, each scored against the original on held-out text."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from .convert import Conversion, convert
from .evaluate import Fidelity, evaluate
from .options import ConvertOptions


@dataclass(frozen=True)
class Result:
    label: str
    conversion: Conversion
    fidelity: Fidelity
    minutes: float


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def compare(src: str, variants: dict[str, ConvertOptions], eval_text: Path, workdir: Path,
            seq_len: int = 512, samples: int = 64, device: str = "auto",
            progress: bool = False) -> list[Result]:
    """Convert SRC once per variant into workdir/<label> and evaluate each against SRC."""
    results = []
    for label, options in variants.items():
        start = time.perf_counter()
        out = workdir / slug(label)
        conversion = convert(src, out, options, overwrite=True, progress=progress)
        fidelity = evaluate(src, str(out), eval_text, seq_len=seq_len, samples=samples,
                            device=device, progress=progress)
        results.append(Result(label, conversion, fidelity, (time.perf_counter() - start) / 60))
    return results


def markdown_table(results: list[Result]) -> str:
    rows = ["| method | KL(orig ‖ reduced) | perplexity | original perplexity | minutes |",
            "| --- | --- | --- | --- | --- |"]
    rows += [f"| {r.label} | {r.fidelity.kl:.4f} | {r.fidelity.perplexity_reduced:.3f} | "
             f"{r.fidelity.perplexity_original:.3f} | {r.minutes:.2f} |" for r in results]
    return "\n".join(rows)
