"""float32 against bfloat16 products (--compute-dtype) on trained bench models: are the groups,
the frequencies and the KL the same, and how much faster is bf16? (issue 14, item 3)

For each model, HC-SMoE and O-prune run from one calibration pass per compute dtype; the
groups and frequencies of every layer are compared and both outputs evaluated against the
original (KL on held-out text, fp32 evaluation for both).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from hcconvert.eval.compare import named_variants
from hcconvert.eval.evaluate import evaluate_many
from hcconvert.model.spec import open_source
from hcconvert.pipeline.convert import convert_many
from hcconvert.pipeline.options import ConvertOptions

METHODS = ["hc-smoe", "o-prune", "auto"]


def run(model: Path, dtype: str, args, workdir: Path) -> tuple[dict, float, list]:
    """Each method's hcconvert.json layers, the pass's seconds, and its outputs' fidelity."""
    _, spec = open_source(str(model))
    base = ConvertOptions(experts=spec.num_experts // 2, calib=str(args.calib),
                          calib_samples=args.samples, seq_len=args.seq_len, device="cpu",
                          compute_dtype=dtype)
    variants = named_variants(METHODS, base)
    outputs = [(workdir / f"{dtype}-{name}", options) for name, options in variants.items()]
    start = time.perf_counter()
    convert_many(str(model), outputs, progress=False)
    seconds = time.perf_counter() - start
    layers = {name: json.loads((out / "hcconvert.json").read_text())["layers"]
              for name, (out, _) in zip(variants, outputs, strict=True)}
    fidelity = evaluate_many(str(model), [str(out) for out, _ in outputs], args.eval,
                             args.seq_len, args.eval_samples, "cpu", progress=False)
    return layers, seconds, fidelity


def frequency_gap(a: list, b: list) -> float:
    """Largest relative difference of any expert's top-k count between two runs."""
    return max(abs(x - y) / max(x, 1) for la, lb in zip(a, b, strict=True)
               for x, y in zip(la["frequencies"], lb["frequencies"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--calib", type=Path, default=Path("bench-out/corpus/calib.jsonl"))
    parser.add_argument("--eval", type=Path, default=Path("bench-out/corpus/eval.txt"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.node()} ({platform.machine()}), CPU, {time.strftime('%Y-%m-%d')}")
    print("| model | method | same groups | max freq. gap | KL fp32 | KL bf16 | KL gap "
          "| pass fp32 s | pass bf16 s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {d: run(model, d, args, Path(tmp)) for d in ("float32", "bfloat16")}
        (l32, s32, f32), (l16, s16, f16) = runs["float32"], runs["bfloat16"]
        for i, name in enumerate(METHODS):
            same = [a["groups"] for a in l32[name]] == [b["groups"] for b in l16[name]]
            print(f"| {model.name} | {name} | {'yes' if same else 'no'} | "
                  f"{frequency_gap(l32[name], l16[name]):.4f} | {f32[i].kl:.5f} | "
                  f"{f16[i].kl:.5f} | {abs(f16[i].kl - f32[i].kl):.1e} | {s32:.1f} | "
                  f"{s16:.1f} |", flush=True)


if __name__ == "__main__":
    main()
