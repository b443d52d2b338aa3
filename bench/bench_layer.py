"""MoE layers at a real model's expert shape, phase by phase, for each method.

Builds a two-layer Mixtral-style checkpoint whose MoE layers have the expert shape of a real
model (random bf16 weights; --experts-like random or sharing a base, as upcycled and real
experts do), converts it in a fresh process per method, and prints each phase's seconds (the
pipeline's own stage timer), the peak host memory, and the --dry-run estimate of both.

    python bench/bench_layer.py --shape mixtral --tokens 2048 --methods hc-smoe,auto
    python bench/bench_layer.py --shape qwen3 --base shared

Shapes (hidden, expert ffn, experts, top-k, kept): mixtral = Mixtral-8x7B (4096, 14336, 8, 2,
4); qwen3 = Qwen3-30B-A3B (2048, 768, 128, 8, 64); deepseek = DeepSeek-V3's experts (7168,
2048, 256, 8, 128) with --scale-experts to fit this machine (costs per expert are linear).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hcconvert.cli.demo import data_file, write_tokenizer

SHAPES = {  # hidden, expert ffn, experts, top-k, experts kept, attention heads, kv heads
    "mixtral": (4096, 14336, 8, 2, 4, 32, 8),
    # issue 27's measurement: Mixtral's expert width at half its hidden size
    "mixtral-h2048": (2048, 14336, 8, 2, 4, 16, 4),
    "qwen3": (2048, 768, 128, 8, 64, 32, 4),
    "deepseek": (7168, 2048, 256, 8, 128, 56, 8),
}

CONVERT_IN_CHILD = """
import json, sys, time
from pathlib import Path
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.resources import peak_rss_bytes, process_seconds
src, out, calib, method, experts, tokens = sys.argv[1:7]
options = ConvertOptions(experts=int(experts), calib=calib, calib_samples=int(tokens) // 256,
                         seq_len=256, device="cpu", method=method)
conversion = convert(src, Path(out), options, progress=False)
print(json.dumps({"peak_rss": peak_rss_bytes(), "wall": process_seconds(),
                  "conversion": conversion.timer.wall, "stages": conversion.timer.seconds,
                  "peaks": conversion.timer.peaks,
                  "layers": [vars(r) for r in conversion.layers]}))
"""

DRY_RUN_IN_CHILD = """
import json, sys
from hcconvert.cli.report import estimates
from hcconvert.pipeline.options import ConvertOptions
src, calib, method, experts, tokens = sys.argv[1:6]
options = ConvertOptions(experts=int(experts), calib=calib, calib_samples=int(tokens) // 256,
                         seq_len=256, device="cpu", method=method)
print(json.dumps(estimates(src, options)))
"""


def random(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5


def build(directory: Path, shape: str, base: str, scale: int,
          layers: int = 2) -> tuple[int, int]:
    """The checkpoint: `layers` MoE layers of the shape (two, so that reading the next layer
    and writing the last overlap a layer's compute as in a real model); returns the experts
    each has and how many to keep."""
    hidden, ffn, experts, top_k, kept, heads, kv_heads = SHAPES[shape]
    experts, kept = experts // scale, kept // scale
    directory.mkdir(parents=True)
    vocab = write_tokenizer(directory)
    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
               "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": random(gen, vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "input_layernorm.weight": torch.ones(hidden),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden),
            prefix + "self_attn.q_proj.weight": random(gen, hidden, hidden),
            prefix + "self_attn.k_proj.weight": random(gen, kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": random(gen, kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": random(gen, hidden, hidden),
            prefix + "block_sparse_moe.gate.weight": random(gen, experts, hidden) * 4})
        shared = {name: random(gen, *dims) for name, dims in
                  (("w1", (ffn, hidden)), ("w3", (ffn, hidden)), ("w2", (hidden, ffn)))}
        for e in range(experts):
            for name, dims in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)),
                               ("w2", (hidden, ffn))):
                own = random(gen, *dims)
                weight = shared[name] + 0.3 * own if base == "shared" else own
                # bf16 at once: two layers of Mixtral's experts in fp32 would hold 11 GB
                tensors[f"{prefix}block_sparse_moe.experts.{e}.{name}.weight"] = weight.to(
                    torch.bfloat16)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_local_experts": experts,
              "num_experts_per_tok": top_k, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    return experts, kept


def child(code: str, *args) -> dict:
    environment = {**os.environ, "HCCONVERT_STAGE_MEMORY": "1"}  # each stage's peak memory
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                            text=True, env=environment)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--base", choices=["random", "shared"], default="random")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    parser.add_argument("--methods", default="hc-smoe,auto")
    parser.add_argument("--scale-experts", type=int, default=1,
                        help="divide the expert count (and the kept count) by this")
    parser.add_argument("--calib", default=str(data_file("demo_calib.txt")))
    parser.add_argument("--no-estimate", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        experts, kept = build(src, args.shape, args.base, args.scale_experts)
        os.sync()  # the checkpoint's writeback would slow the dry run's timing of the rates
        hidden, ffn = SHAPES[args.shape][:2]
        print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"layer: hidden {hidden}, ffn {ffn}, {experts} experts ({args.base}) -> {kept}, "
              f"{args.tokens} calibration tokens, CPU\n")
        for method in args.methods.split(","):
            estimate = (child(DRY_RUN_IN_CHILD, src, args.calib, method, kept, args.tokens)
                        if not args.no_estimate else {"minutes": 0, "host": 0})
            run = child(CONVERT_IN_CHILD, src, Path(tmp) / method, args.calib, method, kept,
                        args.tokens)
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(
                run["stages"].items(), key=lambda item: -item[1]) if v >= 0.05)
            print(f"### {method}\nwall {run['wall']:.1f}s (conversion {run['conversion']:.1f}s; "
                  f"estimate {estimate['minutes'] * 60:.1f}s); peak host "
                  f"{run['peak_rss'] / 1e9:.2f} GB (estimate {estimate['host'] / 1e9:.2f} GB)")
            print(f"stages: {stages}")
            peaks = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(
                run["peaks"].items(), key=lambda item: -item[1]))
            print(f"stage peaks: {peaks}")
            choices = [layer.get("choice") for layer in run["layers"]]
            if any(choices):
                print(f"chosen: {choices}; fit: {[layer.get('fit') for layer in run['layers']]}")
            print(flush=True)


if __name__ == "__main__":
    main()
