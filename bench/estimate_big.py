"""The --dry-run memory estimate for DeepSeek-V3 and Kimi-K2 at their real shapes, for bf16 and
FP8 (128x128 block scales) sources, without a GPU budget and under 40 GB and 80 GB.

No weights are needed: config.json is written from the Hub's values, the skeleton is built on
the meta device, and the stored sizes follow from the shapes. Prints a markdown table
(docs/BENCHMARKS.md, "GPU memory under a budget").

    python bench/estimate_big.py [--samples 32] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import math

import torch

from hcconvert.errors import UserError
from hcconvert.model.families import family_for
from hcconvert.model.spec import ModelSpec
from hcconvert.pipeline.estimate import estimate_from_shapes, moe_layer_values
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.resources import human_bytes

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "moe_intermediate_size": 2048, "intermediate_size": 18432, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "moe_layer_freq": 1, "vocab_size": 129280,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
}
KIMI_K2 = {**DEEPSEEK_V3, "model_type": "kimi_k2", "num_attention_heads": 64,
           "num_key_value_heads": 64, "n_routed_experts": 384, "first_k_dense_replace": 1,
           "n_group": 1, "topk_group": 1, "vocab_size": 163840, "routed_scaling_factor": 2.827,
           "num_nextn_predict_layers": 0}
MODELS = {"DeepSeek-V3": DEEPSEEK_V3, "Kimi-K2": KIMI_K2}
BUDGETS = (None, 40 * 10**9, 80 * 10**9)
FP8_BLOCK = 128


def stored_bytes(shape: tuple[int, ...], name: str, fp8: bool) -> int:
    """A tensor's bytes as the Hub stores it: in the FP8 releases every linear weight is e4m3
    with one fp32 scale per 128x128 block (the router, norms and embeddings stay bf16)."""
    values = math.prod(shape)
    if fp8 and len(shape) == 2 and name.endswith("proj.weight"):
        blocks = math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
        return values + 4 * blocks
    return 2 * values


def largest_layer_bytes(spec: ModelSpec, fp8: bool) -> int:
    """The largest MoE layer as stored: its other tensors and its routed experts."""
    decoder = spec.decoder()
    expert = sum(stored_bytes(shape, "proj.weight", fp8) for shape in
                 ((spec.ffn, spec.hidden), (spec.ffn, spec.hidden), (spec.hidden, spec.ffn)))
    return max(sum(stored_bytes(shape, name, fp8)
                   for name, (shape, _) in decoder.expected_tensors(layer).items())
               for layer in spec.moe_layers) + spec.num_experts * expert


def rows(samples: int, seq_len: int):
    for model, config in MODELS.items():
        spec = ModelSpec.from_config(config, family_for(config))
        options = ConvertOptions(experts=spec.num_experts // 2, calib_samples=samples,
                                 seq_len=seq_len)
        globals_bytes = 2 * 2 * config["vocab_size"] * config["hidden_size"]
        other = moe_layer_values(spec)
        mtp = config["num_nextn_predict_layers"] > 0
        for source in ("bf16", "fp8"):
            layer = largest_layer_bytes(spec, source == "fp8")
            for budget in BUDGETS:
                try:
                    found = estimate_from_shapes(spec, options, torch.bfloat16, globals_bytes,
                                                 layer, other, True, mtp, budget)
                except UserError as err:
                    yield model, source, budget, layer, str(err), "", ""
                    continue
                chunk = "all" if found.chunk_experts is None else str(found.chunk_experts)
                yield (model, source, budget, layer, human_bytes(found.device),
                       human_bytes(found.host), chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"{args.samples} x {args.seq_len} calibration tokens, --method auto, R = E/2, "
          "bf16 compute")
    print("| model | source | --max-gpu-memory | largest layer | GPU peak | host peak | "
          "experts per chunk |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, source, budget, layer, device, host, chunk in rows(args.samples, args.seq_len):
        limit = "none" if budget is None else human_bytes(budget)
        print(f"| {model} | {source} | {limit} | {human_bytes(layer)} | {device} | {host} | "
              f"{chunk} |")


if __name__ == "__main__":
    main()
