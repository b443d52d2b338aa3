"""Which reduced router keeps the most quality: dominant, freq-avg or lse-fit (make bench).

Converts a model once per router and expert count with HC-SMoE and prints KL(original ‖ reduced)
and perplexity on held-out text, as a markdown table for docs/BENCHMARKS.md.

    python bench/router_table.py --model bench-out/models/mixtral-scratch \
        --calib bench-out/corpus/calib.jsonl --eval bench-out/corpus/eval.txt --experts 4 2
    python bench/router_table.py --demo    # the planted demo model and its shipped texts
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hcconvert.cli.demo import build_planted_mixtral, data_file
from hcconvert.eval.compare import compare, markdown_table
from hcconvert.methods.router import ROUTERS
from hcconvert.pipeline.options import ConvertOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--demo", action="store_true", help="use the planted demo model")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            args.model = Path(tmp) / "planted"
            build_planted_mixtral(args.model)
            args.calib, args.eval = data_file("demo_calib.txt"), data_file("demo_eval.txt")
        for experts in args.experts:
            variants = {f"{router}, {experts} experts": ConvertOptions(
                experts=experts, router=router, calib=str(args.calib),
                calib_samples=args.calib_samples, seq_len=args.seq_len, method="hc-smoe")
                for router in ROUTERS}
            results = compare(str(args.model), variants, args.eval, Path(tmp),
                              seq_len=args.seq_len, samples=args.eval_samples, device="cpu")
            print(markdown_table(results), flush=True)


if __name__ == "__main__":
    main()
