"""End to end at Mixtral-8x7B layer shapes: read / compute / write per layer, peaks, extrapolation.

Writes a synthetic checkpoint (random bf16 weights, Mixtral-8x7B layer shapes, a few layers,
5 GB shards) with hcconvert's own streaming ShardWriter, converts it 8 -> 4 experts with the
paper's calibration budget (32 x 2048 tokens), and prints per-layer stage times, GPU peak,
host peak RSS, the time to copy the same bytes, and the figures extrapolated to 32 layers.
Meant for a GPU (`--device cuda`); `--hidden 256 --ffn 512` makes a quick CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hcconvert.cli.demo import data_file, write_tokenizer
from hcconvert.io.tensors import SAFETENSORS_DTYPES, OutputTensor
from hcconvert.io.writer import ShardWriter
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.resources import human_bytes, peak_gpu_bytes, peak_rss_bytes


def mixtral_tensors(args) -> list[OutputTensor]:
    h, f, kv = args.hidden, args.ffn, args.hidden // 4  # 8 KV heads of 32 query heads
    bf16 = SAFETENSORS_DTYPES[torch.bfloat16]
    shapes = {"model.embed_tokens.weight": (args.vocab, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        layer_shapes = {"input_layernorm": (h,), "post_attention_layernorm": (h,),
                        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                        "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                        "block_sparse_moe.gate": (args.experts, h)}
        for e in range(args.experts):
            expert = f"block_sparse_moe.experts.{e}."
            layer_shapes.update({expert + "w1": (f, h), expert + "w3": (f, h),
                                 expert + "w2": (h, f)})
        shapes.update({f"{p}{name}.weight": dims for name, dims in layer_shapes.items()})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)})
    return [OutputTensor(name, bf16, shape) for name, shape in shapes.items()]


def write_checkpoint(directory: Path, args, shard_bytes: int = 5 * 10**9) -> None:
    """Random weights, one tensor in memory at a time; norms are ones."""
    directory.mkdir(parents=True)
    tensors = mixtral_tensors(args)
    with ShardWriter(directory, tensors, shard_bytes) as writer:
        for t in tensors:
            if len(t.shape) == 1:
                value = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                value = (torch.randn(t.shape) * t.shape[1] ** -0.5).to(torch.bfloat16)
            writer.write(t.name, value)
    write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": args.experts, "num_experts_per_tok": 2, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False}))


def add_checkpoint_args(parser: argparse.ArgumentParser, layers: int, hidden: int, ffn: int,
                        samples: int, seq_len: int) -> None:
    """The synthetic checkpoint's shape (write_checkpoint) and the calibration budget, with
    each benchmark's own defaults."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--ffn", type=int, default=ffn)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq-len", type=int, default=seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_checkpoint_args(parser, layers=3, hidden=4096, ffn=14336, samples=32, seq_len=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        write_checkpoint(root / "src", args)
        calib = root / "calib.txt"  # enough byte-level tokens for the full sample
        calib.write_text(data_file("demo_calib.txt").read_text()
                         * (1 + args.samples * args.seq_len // 40_000))
        start = time.perf_counter()
        shutil.copytree(root / "src", root / "copy")
        copy_seconds = time.perf_counter() - start
        shutil.rmtree(root / "copy")
        options = ConvertOptions(experts=args.experts // 2, calib=str(calib),
                                 calib_samples=args.samples, seq_len=args.seq_len,
                                 device=args.device, method="hc-smoe")
        conversion = convert(str(root / "src"), root / "out", options)
        report(args, conversion, copy_seconds)


def report(args, conversion, copy_seconds: float) -> None:
    plan, timer = conversion.plan, conversion.timer
    per_layer = {k: v / args.layers for k, v in timer.seconds.items()}
    wall_per_layer = timer.wall / args.layers
    gpu = peak_gpu_bytes()
    print(f"\ndevice: {torch.cuda.get_device_name() if gpu is not None else 'cpu'}")
    print(f"checkpoint: {args.layers} layers, {human_bytes(plan.bytes_in)} -> "
          f"{human_bytes(plan.bytes_out)}; {args.samples} x {args.seq_len} calibration tokens")
    print("per layer: " + ", ".join(f"{k} {v:.2f}s" for k, v in per_layer.items())
          + f" (stages overlap); wall {wall_per_layer:.2f}s")
    print(f"peak GPU {human_bytes(gpu) if gpu is not None else '-'}, "
          f"peak host RSS {human_bytes(peak_rss_bytes())}")
    print(f"copy of the same bytes: {copy_seconds:.1f}s "
          f"({copy_seconds / args.layers:.2f}s per layer)")
    print(f"extrapolated to 32 layers: conversion {32 * wall_per_layer:.0f}s, "
          f"copy {32 * copy_seconds / args.layers:.0f}s")


if __name__ == "__main__":
    main()
