"""Benchmark the layer fit (layerfit.fit_down), the bulk of the default `--method auto`.

Times fit_down at one MoE layer's shapes on random bf16 experts and tokens, once keeping each
expert's activations and factored normal equations between rounds (FIT_KEEP_BYTES, the
default) and once recomputing them every round (nothing kept), and checks the two agree. The
target is the layer with other down projections, so the fit has something to find.

    python bench/bench_fit.py                       # the peer benchmark's shapes
    python bench/bench_fit.py --hidden 4096 --ffn 14336 --tokens 16384
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from hcconvert.methods import layerfit
from hcconvert.model.experts import Experts


def layer(args):
    """Tokens [T, H], the kept experts, a top-k routing rule over them, and the target."""
    torch.manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) / shape[-1] ** 0.5).to(torch.bfloat16)

    x = random(args.tokens, args.hidden) * args.hidden ** 0.5
    router = torch.randn(args.experts, args.hidden) / args.hidden ** 0.5

    def route(tokens: torch.Tensor):
        weights, index = torch.softmax(tokens.float() @ router.T, -1).topk(args.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), index

    shape = (args.experts, args.ffn, args.hidden)
    experts = Experts(random(*shape), random(*shape), random(args.experts, args.hidden, args.ffn))
    other = Experts(experts.gate, experts.up, random(args.experts, args.hidden, args.ffn))
    target = (layerfit.layer_output(x, experts, route) + layerfit.layer_output(x, other, route)) / 2
    return x, experts, route, target


def timed(args, keep_bytes: int) -> tuple[float, torch.Tensor]:
    """Median seconds of fit_down with FIT_KEEP_BYTES = keep_bytes, and its result."""
    layerfit.FIT_KEEP_BYTES = keep_bytes
    x, experts, route, target = layer(args)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        down = layerfit.fit_down(x, target, experts, route)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6144, help="the fit's share of 8192")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4, help="experts kept")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kept_gb = layerfit.kept_bytes(args.tokens, args.top_k, args.experts, args.ffn) / 1e9
    kept_seconds, kept = timed(args, layerfit.FIT_KEEP_BYTES)
    recomputed_seconds, recomputed = timed(args, 0)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"shapes: {args.tokens} tokens, hidden {args.hidden}, ffn {args.ffn}, "
          f"{args.experts} experts, top-{args.top_k}; median of {args.repeats}")
    print(f"| fit_down | seconds |\n| --- | --- |\n"
          f"| kept between rounds ({kept_gb:.2f} GB) | {kept_seconds:.2f} |\n"
          f"| recomputed every round | {recomputed_seconds:.2f} |")
    print(f"largest difference: {(kept - recomputed).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
