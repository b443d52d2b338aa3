"""Which reduction keeps the most quality on small MoEs trained on real text (make bench-quality).

For each model and expert count, runs `compare` over the named methods and a few levers on
HC-SMoE (a group-size cap, the least-squares merge, the lse-fit router, merged propagation),
all from one calibration pass where they share it, and prints markdown tables with
KL(original ‖ reduced) and perplexity on held-out text. Models come from bench/train_moe.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import tempfile
import time
from pathlib import Path

from hcconvert.eval.compare import compare, markdown_table, named_variants
from hcconvert.model.spec import open_source
from hcconvert.pipeline.options import ConvertOptions

METHODS = ["hc-smoe", "router-logits", "weights", "kmeans", "dominant", "random", "fix-dom",
           "msmoe", "mergemoe",
           "f-prune", "o-prune",
           # issue 11: fitted to the original layer's output, REAM, and the per-layer choice
           "f-prune-fit", "o-prune-fit", "msmoe-fit", "ream", "auto",
           # issue 24: REAM as published above, hcconvert's earlier variant here
           "ream-balanced"]


def levers(base: ConvertOptions, experts_before: int) -> dict[str, ConvertOptions]:
    cap = max(2, math.ceil(experts_before / base.experts))  # tightest cap that can hold all
    return {
        f"hc-smoe, groups of at most {cap}": dataclasses.replace(base, max_group_size=cap),
        "hc-smoe + aligned merge (msmoe)": dataclasses.replace(base, merge="msmoe"),
        "hc-smoe + mergemoe merge": dataclasses.replace(base, merge="mergemoe"),
        "hc-smoe + lse-fit router": dataclasses.replace(base, router="lse-fit"),
        "hc-smoe, propagate merged": dataclasses.replace(base, propagate="merged"),
        "dominant + aligned merge": dataclasses.replace(base, grouping="dominant",
                                                        merge="msmoe"),
        "dominant + mergemoe merge": dataclasses.replace(base, grouping="dominant",
                                                         merge="mergemoe"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--calib", type=Path, default=Path("bench-out/corpus/calib.jsonl"))
    parser.add_argument("--eval", type=Path, nargs="+",
                        default=[Path("bench-out/corpus/eval.txt")],
                        help="held-out texts; with several, a table per text too")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated named methods (default: all of METHODS)")
    parser.add_argument("--no-levers", action="store_true",
                        help="only the named methods, not the HC-SMoE levers")
    args = parser.parse_args()
    print(f"machine: {platform.node()} ({platform.machine()}), CPU, "
          f"{time.strftime('%Y-%m-%d')}\n")
    for model in args.models:
        _, spec = open_source(str(model))
        for fraction in args.fractions:
            experts = max(1, round(spec.num_experts * fraction))
            base = ConvertOptions(experts=experts, calib=str(args.calib),
                                  calib_samples=args.calib_samples, seq_len=args.seq_len,
                                  device="cpu")
            variants = named_variants(args.methods.split(","), base)
            if not args.no_levers:
                hc_smoe = dataclasses.replace(base, method="hc-smoe")
                variants.update(levers(hc_smoe, spec.num_experts))
            with tempfile.TemporaryDirectory() as tmp:
                results = compare(str(model), variants, args.eval, Path(tmp),
                                  seq_len=args.seq_len, samples=args.eval_samples, device="cpu")
            print(f"### {model.name}: {spec.num_experts} -> {experts} experts\n")
            print(markdown_table(results) + "\n", flush=True)


if __name__ == "__main__":
    main()
