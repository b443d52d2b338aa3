"""Peer benchmark (issue 14): hcconvert's O-prune and HC-SMoE against llm-compressor's REAP
pruning and an in-memory HC-SMoE built on transformers, on one synthetic Mixtral-shaped
checkpoint and the same calibration tokens.

Every method runs in a fresh process (hcconvert as the `hcconvert` command a user runs, exit
included), once per round, the methods in a rotated order each round (paired runs on a shared
machine: run the script itself under `nice -n 5` there); the table gives median wall time (the
whole process: start-up, load, calibration, write), median peak RSS (VmHWM), and the achieved
fraction of this machine's measured matmul rate, counted on the minimum FLOPs the method needs
(min_flops). --baseline adds HC-SMoE runs of an earlier checkout, to measure a change in the
same rounds.

llm-compressor pins an older transformers than hcconvert, so it cannot share hcconvert's
environment: give a Python with it installed (`python -m venv peers && peers/bin/pip install
torch llmcompressor`) as --llmcompressor-python; without it that row is skipped. The
in-memory HC-SMoE needs only transformers. Nothing here is needed by `make test`.

    python bench/bench_peers.py --rounds 3 --llmcompressor-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
EXPERTS_KEPT = 4  # of 8: REAP's sparsity 0.5
MATMUL_ROWS = 1024  # a batch of ATTENTION_BATCH sequences of 256 tokens
BASELINE = " (baseline)"  # marks a method run from the --baseline checkout


def read_tokens(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


# ---- the methods, each run in a child process ------------------------------------------------

def report_peak_rss() -> None:
    """Print this process's peak resident set (VmHWM, its own memory map's) as the last line
    of its output, for the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(json.dumps({"peak_rss": int(line.split()[1]) * 1024}), flush=True)


def run_hcconvert_command(args) -> None:
    """The `hcconvert` command a user runs (console_main: its exit included), for one of its
    labels (method, then the compute dtype after a colon); a --baseline checkout without
    console_main runs its main. The peak is reported by an atexit handler, which both run."""
    import hcconvert.cli.main as cli

    methods = {"hcconvert-o-prune": ["--method", "prune", "--prune-by", "output"],
               "hcconvert-hc-smoe": ["--method", "merge"]}
    name, _, dtype = args.child.partition(":")
    sys.argv = ["hcconvert", str(args.workdir / "src"), "--experts", str(EXPERTS_KEPT),
                "--calib", str(args.workdir / "calib.txt"), "--calib-samples", str(args.samples),
                "--seq-len", str(args.seq_len), "--device", "cpu", "--compute-dtype",
                dtype or "auto", "--out", str(args.workdir / f"out-{args.child}"), *methods[name]]
    atexit.register(report_peak_rss)
    getattr(cli, "console_main", cli.main)()


def run_llmcompressor_reap(model_dir: Path, tokens: torch.Tensor, out: Path) -> None:
    """llm-compressor's oneshot with its REAP pruning modifier, in the checkpoint's dtype."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()})
    oneshot(model=model, dataset=dataset, recipe=REAPPruningModifier(sparsity=0.5),
            num_calibration_samples=tokens.shape[0], max_seq_length=tokens.shape[1],
            output_dir=str(out))


def run_in_memory_hcsmoe(model_dir: Path, tokens: torch.Tensor, out: Path) -> None:
    """HC-SMoE as the research code does it: the whole model in memory, in the checkpoint's
    dtype; hooks on every MoE block run every expert on every token for the mean outputs and
    count the router's top-k; then average-linkage clustering of the mean outputs and
    frequency-weighted merging of each group's weights and router rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    blocks = [layer.mlp for layer in model.model.layers]
    sums = [torch.zeros(block.experts.num_experts, model.config.hidden_size) for block in blocks]
    counts = [torch.zeros(block.experts.num_experts) for block in blocks]
    hooks = [block.register_forward_pre_hook(
        lambda module, args, i=i: observe_block(module, args[0], sums[i], counts[i]))
        for i, block in enumerate(blocks)]
    with torch.no_grad():
        for batch in tokens.split(4):
            model.model(input_ids=batch)
    for hook in hooks:
        hook.remove()
    for block, total, count in zip(blocks, sums, counts, strict=True):
        merge_block(block, cluster(total / tokens.numel(), EXPERTS_KEPT), count)
    model.config.num_local_experts = EXPERTS_KEPT
    model.save_pretrained(out)


def observe_block(block, hidden: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor):
    x = hidden.reshape(-1, hidden.shape[-1])
    _, _, index = block.gate(x)
    counts += torch.bincount(index.flatten(), minlength=len(counts)).float()
    experts = block.experts
    for e in range(experts.num_experts):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        output = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        sums[e] += output.float().sum(0)


def cluster(features: torch.Tensor, groups: int) -> list[list[int]]:
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(features.double().numpy(), "average"), groups, "maxclust")
    return [[e for e, label in enumerate(labels) if label == c] for c in sorted(set(labels))]


def merge_block(block, groups: list[list[int]], counts: torch.Tensor) -> None:
    def merged(stacked: torch.Tensor) -> torch.Tensor:
        rows = []
        for group in groups:
            weights = counts[group] / counts[group].sum().clamp_min(1)
            rows.append(torch.einsum("g,g...->...", weights.to(stacked.dtype), stacked[group]))
        return torch.nn.Parameter(torch.stack(rows), requires_grad=False)

    experts = block.experts
    experts.gate_up_proj, experts.down_proj = merged(experts.gate_up_proj.data), merged(
        experts.down_proj.data)
    block.gate.weight = merged(block.gate.weight.data)
    experts.num_experts = block.gate.num_experts = len(groups)


def child(args) -> None:
    """Run one method; its peak RSS is the last line it prints (the parent times it)."""
    if args.child.startswith("hcconvert"):
        return run_hcconvert_command(args)
    tokens_file, model, out = args.workdir / "tokens.safetensors", args.workdir / "src", \
        args.workdir / f"out-{args.child}"
    if args.child == "llm-compressor-reap":
        run_llmcompressor_reap(model, read_tokens(tokens_file), out)
    elif args.child == "in-memory-hc-smoe":
        run_in_memory_hcsmoe(model, read_tokens(tokens_file), out)
    else:
        raise SystemExit(f"unknown method {args.child}")
    report_peak_rss()


# ---- the parent: model, tokens, matmul rate, paired runs, table ------------------------------

def build_inputs(args) -> None:
    """The synthetic checkpoint, the calibration text, and the tokens hcconvert cuts from it
    (the peers get exactly these)."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(BENCH))
    from bench_e2e import write_checkpoint

    from hcconvert.cli.demo import data_file
    from hcconvert.io.source import Checkpoint
    from hcconvert.model.tokenizer import model_tokenizer
    from hcconvert.pipeline.calibration import text_tokens

    write_checkpoint(args.workdir / "src", args)
    calib = args.workdir / "calib.txt"
    calib.write_text(data_file("demo_calib.txt").read_text()
                     * (1 + args.samples * args.seq_len // 40_000))
    tokenizer = model_tokenizer(Checkpoint(args.workdir / "src"))
    tokens = text_tokens(calib, tokenizer, args.samples, args.seq_len, seed=42)
    save_file({"input_ids": tokens.contiguous()}, args.workdir / "tokens.safetensors")


def matmul_rate(dtype: torch.dtype, hidden: int, ffn: int, repeats: int = 30) -> float:
    """Median GFLOP/s of a [MATMUL_ROWS, hidden] x [hidden, ffn] torch.matmul."""
    a, b = torch.randn(MATMUL_ROWS, hidden, dtype=dtype), torch.randn(hidden, ffn, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * MATMUL_ROWS * hidden * ffn / statistics.median(seconds) / 1e9


def min_flops(args, method: str) -> float:
    """The FLOPs a method cannot avoid, from the shapes: attention projections and scores,
    the router, and the routed experts for every layer's output; HC-SMoE's mean outputs also
    need every expert's gate and up products on every token (the down projection of the mean
    activation is negligible)."""
    h, f, e, k, kv = args.hidden, args.ffn, args.experts, 2, args.hidden // 4
    attention = 2 * (2 * h * h + 2 * h * kv) + 2 * args.seq_len * h  # causal: seq/2 keys
    per_token = attention + 2 * h * e + k * 3 * 2 * h * f
    if "hc-smoe" in method:
        per_token += (e - k) * 2 * 2 * h * f  # gate and up of the experts not routed to
    return per_token * args.samples * args.seq_len * args.layers


def run_method(args, method: str, python: str) -> dict:
    name, baseline, _ = method.partition(BASELINE)
    # hcconvert from this checkout, or from the --baseline one, imported the same way.
    env = {**os.environ, "PYTHONPATH": str(args.baseline if baseline else BENCH.parent)}
    start = time.perf_counter()
    result = subprocess.run(
        [python, __file__, "--child", name, "--workdir", str(args.workdir),
         "--samples", str(args.samples), "--seq-len", str(args.seq_len)],
        capture_output=True, text=True, cwd=BENCH.parent, env=env)
    wall = time.perf_counter() - start
    shutil.rmtree(args.workdir / f"out-{name}", ignore_errors=True)  # the next run writes there
    if result.returncode:
        print(f"{method} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return {"wall": None, "peak_rss": None}
    return {"wall": wall, **json.loads(result.stdout.strip().splitlines()[-1])}


def auto_dtype() -> torch.dtype:
    """What hcconvert's default (--compute-dtype auto) computes this bf16 checkpoint in here."""
    from hcconvert.model.decoder import compute_dtype as hcconvert_compute_dtype

    return hcconvert_compute_dtype(torch.device("cpu"), torch.bfloat16)


def other_dtype() -> str:
    """The label suffix of hcconvert's runs in the dtype auto does not pick here."""
    return ":float32" if auto_dtype() != torch.float32 else ":bfloat16"


def methods(args) -> dict[str, str]:
    """Each method's label and the Python that runs it. hcconvert runs with its default and
    in the other dtype; the baseline checkout is told its dtypes (its auto may differ)."""
    ours, other = ("hcconvert-o-prune", "hcconvert-hc-smoe"), other_dtype()
    found = {method + dtype: sys.executable for method in ours for dtype in ("", other)}
    found["in-memory-hc-smoe"] = sys.executable
    if args.llmcompressor_python:
        found["llm-compressor-reap"] = args.llmcompressor_python
    if args.baseline:
        for dtype in (":" + str(auto_dtype()).removeprefix("torch."), other):
            found["hcconvert-hc-smoe" + dtype + BASELINE] = sys.executable
    return {method: python for method, python in found.items()
            if not args.only or method in args.only}


def compute_dtype(method: str) -> torch.dtype:
    """What a method's matmuls run in: hcconvert's the one its label names, else its default;
    the peers run the checkpoint's bf16."""
    name, _, dtype = method.removesuffix(BASELINE).partition(":")
    if name.startswith("hcconvert"):
        return getattr(torch, dtype) if dtype else auto_dtype()
    return torch.bfloat16


def print_rates(rates: dict[torch.dtype, float]) -> None:
    print("matmul rate: " + ", ".join(f"{str(d).removeprefix('torch.')} {r:.0f} GFLOP/s"
                                      for d, r in rates.items()) + "\n", flush=True)


def report(args, runs: dict[str, list[dict]], rates: dict[torch.dtype, float]) -> None:
    print(f"\nmachine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, {args.experts} "
          f"experts, top-2, bf16; {args.samples} x {args.seq_len} tokens; {args.rounds} rounds")
    print_rates(rates)
    print(f"hcconvert's default computes in {str(auto_dtype()).removeprefix('torch.')} here\n")
    print("| method | wall (median) | runs | peak RSS (median) | min TFLOP | "
          "of the matmul rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, results in runs.items():
        walls = [r["wall"] for r in results if r["wall"] is not None]
        if not walls:
            print(f"| {method} | failed | | | | |")
            continue
        wall, flops = statistics.median(walls), min_flops(args, method)
        rss = statistics.median(r["peak_rss"] for r in results if r["peak_rss"])
        share = flops / wall / 1e9 / rates[compute_dtype(method)]
        print(f"| {method} | {wall:.1f} s | {' '.join(f'{w:.1f}' for w in walls)} | "
              f"{rss / 1e9:.2f} GB | {flops / 1e12:.2f} | {share:.0%} |")
    other = other_dtype()
    pairs = [(ours + dtype, peer) for ours, peer in (("hcconvert-o-prune", "llm-compressor-reap"),
                                                      ("hcconvert-hc-smoe", "in-memory-hc-smoe"))
             for dtype in ("", other)]
    pairs += [(ours, ours + other) for ours in ("hcconvert-o-prune", "hcconvert-hc-smoe")]
    merge, auto = "hcconvert-hc-smoe", ":" + str(auto_dtype()).removeprefix("torch.")
    pairs += [(merge, merge + auto + BASELINE), (merge + other, merge + other + BASELINE)]
    for ours, peer in pairs:
        ratios = [p["wall"] / o["wall"] for o, p in zip(runs.get(ours, []), runs.get(peer, []),
                                                        strict=False)
                  if o["wall"] and p["wall"]]
        if ratios:
            print(f"{ours} vs {peer}: {statistics.median(ratios):.2f}x faster "
                  f"(median of per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})")


def child_main() -> None:
    """A child's arguments (run_method's): it imports no hcconvert bench, since a peer's child
    runs in the peer's own environment."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    child(parser.parse_args())


def main() -> None:
    if "--child" in sys.argv:
        return child_main()
    # The parent alone imports hcconvert's benches: the peers' children run in other envs.
    sys.path.insert(0, str(BENCH))
    from bench_e2e import add_checkpoint_args

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser, layers=16, hidden=1024, ffn=2048, samples=32, seq_len=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llmcompressor-python", help="a Python with llmcompressor installed")
    parser.add_argument("--baseline", type=Path,
                        help="an earlier checkout of hcconvert whose HC-SMoE runs too")
    parser.add_argument("--only", nargs="+", help="run just these methods (their labels)")
    parser.add_argument("--workdir", type=Path, help="where the model is built (a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        args.workdir = Path(tmp)
        build_inputs(args)
        rates = {d: matmul_rate(d, args.hidden, args.ffn) for d in (torch.float32, torch.bfloat16)}
        print_rates(rates)  # now too: a run cut short still tells them
        order = methods(args)
        runs: dict[str, list[dict]] = {method: [] for method in order}
        for round_ in range(args.rounds):
            labels = list(order)
            for method in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
                runs[method].append(run_method(args, method, order[method]))
                print(f"round {round_ + 1}: {method} {runs[method][-1]}", flush=True)
        report(args, runs, rates)


if __name__ == "__main__":
    main()
