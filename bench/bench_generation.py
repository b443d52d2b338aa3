"""Long greedy continuations in `hcconvert eval` (issue 24): each step feeding only the new
token through every layer with a KV cache (eval/greedy.py), against every step re-running the
whole sequence through every layer (what eval did before, for 16 tokens).

For each checkpoint shape (the demo's planted Mixtral), continues 8 prompts of 64 held-out
tokens greedily both ways, streamed one layer at a time on the CPU, checks that they write the
same tokens, and prints seconds per token; the cached way twice, keeping built layers between
steps (up to greedy.KEEP_BYTES: these models whole) and reading every layer again each step
(as for a model beyond it). Run with OMP_NUM_THREADS=1 on a shared machine:
two threads contending for busy cores make every parallel op wait.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from hcconvert.cli.demo import DemoShape, build_planted_mixtral, data_file
from hcconvert.eval import greedy
from hcconvert.eval.evaluate import held_out_tokens
from hcconvert.eval.streamed import CheckpointLayers
from hcconvert.model.spec import open_source

CPU = torch.device("cpu")
SHAPES = {"2 layers, H 64": DemoShape(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2),
          "4 layers, H 256": DemoShape(layers=4, hidden=256, ffn=512, heads=8, kv_heads=4)}


def timed(function, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    return function(*args), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=greedy.CONTINUATION_TOKENS)
    args = parser.parse_args()
    print(f"machine: {platform.node()} ({platform.machine()}), CPU, {torch.get_num_threads()} "
          f"threads, {time.strftime('%Y-%m-%d')}\n")
    print("| checkpoint | MB | cached, layers kept | cached, layers read each step | "
          "full recompute | same tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            build_planted_mixtral(src, shape, dtype=torch.float32)
            ckpt, spec = open_source(str(src))
            prompts = held_out_tokens(ckpt, data_file("demo_eval.txt"), greedy.PROMPTS,
                                      greedy.PROMPT_TOKENS)
            written, seconds = [], []
            for keep in (greedy.KEEP_BYTES, 0):
                greedy.KEEP_BYTES = keep
                tokens, taken = timed(greedy.greedy_continuation,
                                      CheckpointLayers(ckpt, spec, CPU), prompts, args.steps,
                                      False)
                written.append(tokens)
                seconds.append(taken)
            tokens, taken = timed(greedy.recomputed_continuation,
                                  CheckpointLayers(ckpt, spec, CPU), prompts, args.steps, False)
            written.append(tokens)
            seconds.append(taken)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e6
            same = all(torch.equal(tokens, written[0]) for tokens in written)
            print(f"| {label} | {size:.0f} | "
                  + " | ".join(f"{s / args.steps:.3f} s/token" for s in seconds)
                  + f" | {same} |", flush=True)


if __name__ == "__main__":
    main()
