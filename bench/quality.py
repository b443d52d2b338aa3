"""Which reduction keeps the most quality on small MoEs trained on real text (make bench-quality).

For each model, expert count and calibration size, converts the model with every named method
(from one calibration pass where they share it), then scores each output against the original
on the held-out text of every domain: KL(original ‖ reduced) per domain, its mean, and the
default's per-layer choice with each candidate's held-out layer error (hcconvert.json).
Models come from bench/train_moe.py, text from bench/corpus.py.

    python bench/quality.py bench-out/models/mixtral-scratch --fractions 0.5 \\
        --calib bench-out/corpus/calib-en.jsonl --calib-tokens 8192 32768 65536
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from hcconvert.eval import greedy
from hcconvert.eval.compare import compare, named_variants
from hcconvert.model.spec import open_source
from hcconvert.pipeline.options import COMPUTE_DTYPES, ConvertOptions

METHODS = ["auto", "o-prune", "f-prune", "msmoe", "o-prune-fit", "f-prune-fit", "msmoe-fit",
           "hc-smoe", "mergemoe", "ream", "ream-balanced"]
SEQ_LEN = 256
EVAL_SAMPLES = 48  # per domain: about 12k tokens of its held-out text
# Long greedy continuations per domain (eval's default is 8): 2 x 7 domains x 128 tokens
# keeps a run of ten methods within the hour on two cores.
greedy.PROMPTS = 2


def domain_files(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("eval-*.txt"))


def domain(fidelity, name: str):
    """A domain's scores (eval-DOMAIN.txt) in a result over several texts."""
    return fidelity.sources[next(key for key in fidelity.sources
                                 if Path(key).name == f"eval-{name}.txt")]


def layer_errors(out: Path) -> list[dict]:
    """Each layer's held-out errors as hcconvert.json records them."""
    return [{"layer": entry["layer"], "choice": entry.get("choice"),
             "fit": entry.get("layer_fit"), "candidates": entry.get("candidates")}
            for entry in json.loads((out / "hcconvert.json").read_text())["layers"]]


def run(model: Path, fraction: float, calib: Path, tokens: int, methods: list[str],
        corpus: Path, compute_dtype: str = "auto") -> dict:
    _, spec = open_source(str(model))
    experts = max(1, round(spec.num_experts * fraction))
    base = ConvertOptions(experts=experts, calib=str(calib), calib_samples=tokens // SEQ_LEN,
                          seq_len=SEQ_LEN, device="cpu", compute_dtype=compute_dtype)
    texts = domain_files(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(str(model), named_variants(methods, base), texts, Path(tmp),
                          seq_len=SEQ_LEN, samples=EVAL_SAMPLES, device="cpu")
        errors = {r.label: layer_errors(r.conversion.out) for r in results}
    names = [text.stem.removeprefix("eval-") for text in texts]
    label = f"{model.parent.name}/{model.name}" if model.name.startswith("step-") else model.name
    return {"model": label, "experts": f"{spec.num_experts}->{experts}",
            "calib": calib.name, "tokens": tokens, "compute_dtype": compute_dtype,
            "methods": {r.label: {
                "kl": r.fidelity.kl, "top1": r.fidelity.top1_agreement,
                "ppl": r.fidelity.perplexity_reduced,
                "ppl_original": r.fidelity.perplexity_original,
                "repetition": r.fidelity.repetition, "distinct": r.fidelity.distinct,
                "generated_ppl": r.fidelity.generated_perplexity,
                "minutes": r.own_minutes,
                "kl_by_domain": {name: domain(r.fidelity, name).kl for name in names},
                "layers": errors[r.label]} for r in results}}


def markdown(result: dict) -> str:
    domains = sorted(next(iter(result["methods"].values()))["kl_by_domain"])
    rows = [f"### {result['model']}, {result['experts']}, {result['tokens']} tokens of "
            f"`{result['calib']}`, {result['compute_dtype']} compute", "",
            "| method | KL (all domains) | " + " | ".join(domains)
            + " | repeated 4-grams | original's ppl of its text | own minutes |",
            "| --- " * (len(domains) + 5) + "|"]
    for label, m in result["methods"].items():
        per = [m["kl_by_domain"][d] for d in domains]
        rows.append(f"| {label} | {m['kl']:.4f} | " + " | ".join(f"{v:.4f}" for v in per)
                    + f" | {m['repetition']:.3f} | {m['generated_ppl']:.1f} | "
                    f"{m['minutes']:.2f} |")
    auto = result["methods"].get("auto")
    if auto:
        rows += ["", "auto's choice per layer (held-out layer error: unfitted -> fitted):"]
        for layer in auto["layers"]:
            tried = ", ".join(f"{name} {c['error_unfitted']:.4f}"
                              + (f"->{c['error_fitted']:.4f}" if c.get("error_fitted") else "")
                              for name, c in (layer["candidates"] or {}).items())
            rows.append(f"- layer {layer['layer']}: {layer['choice']} ({tried})")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--corpus", type=Path, default=Path("bench-out/corpus"))
    parser.add_argument("--calib", type=Path, default=None,
                        help="calibration text (default: the corpus's mixed calib.jsonl)")
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[32768])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, help="also append each result as a JSON line")
    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="auto",
                        help="the conversions' (the evaluation's stays the model's own)")
    args = parser.parse_args()
    calib = args.calib or args.corpus / "calib.jsonl"
    print(f"machine: {platform.node()} ({platform.machine()}), CPU, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n", flush=True)
    for model in args.models:
        for fraction in args.fractions:
            for tokens in args.calib_tokens:
                result = run(model, fraction, calib, tokens, args.methods.split(","),
                             args.corpus, args.compute_dtype)
                print(markdown(result), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
