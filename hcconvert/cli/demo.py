"""`make demo`: a small Mixtral-shaped checkpoint with planted expert groups, reduced four ways.

Each MoE layer's 8 experts are 4 planted pairs of near-duplicates (shuffled, so the pairs are
not neighbours) whose router rows are near-duplicates too. HC-SMoE should find the pairs; we
print planted vs recovered groups, sizes, and KL to the original for HC-SMoE, random grouping,
dropping the least-used experts (F-prune) and the default (auto). Offline; well under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ..eval.compare import Result, compare, markdown_table
from ..pipeline.options import ConvertOptions
from ..resources import human_bytes

SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer (256 byte tokens + specials) that prepends <s>, with no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return tokenizer


def write_tokenizer(directory: Path) -> int:
    """tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
    tokenizer = byte_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True}))
    return tokenizer.get_vocab_size()


@dataclasses.dataclass(frozen=True)
class DemoShape:
    layers: int = 4
    hidden: int = 128
    ffn: int = 256
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2


def planted_groups(shape: DemoShape, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(shape.experts, generator=generator).tolist()
    return sorted(sorted(order[i:i + 2]) for i in range(0, shape.experts, 2))


def build_planted_mixtral(directory: Path, shape: DemoShape = DemoShape(), seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16) -> list[list[list[int]]]:
    """Write the checkpoint (2 shards, Hub-style config); return each layer's planted groups."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    gen = torch.Generator().manual_seed(seed)
    h, f = shape.hidden, shape.ffn
    head_dim = h // shape.heads

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=gen) * std

    tensors = {"model.embed_tokens.weight": randn(vocab, h),
               "model.norm.weight": torch.ones(h), "lm_head.weight": randn(vocab, h, std=h**-0.5)}
    planted = []
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": randn(h, h, std=h**-0.5),
            p + "self_attn.k_proj.weight": randn(shape.kv_heads * head_dim, h, std=h**-0.5),
            p + "self_attn.v_proj.weight": randn(shape.kv_heads * head_dim, h, std=h**-0.5),
            p + "self_attn.o_proj.weight": randn(h, h, std=h**-0.5),
        })
        groups = planted_groups(shape, gen)
        planted.append(groups)
        router = torch.empty(shape.experts, h)
        for group in groups:
            base = {"w1": randn(f, h, std=h**-0.5), "w3": randn(f, h, std=h**-0.5),
                    "w2": randn(h, f, std=f**-0.5)}
            row = randn(h, std=2 * h**-0.5)
            for e in group:
                router[e] = row + randn(h, std=0.2 * h**-0.5)
                for name, w in base.items():
                    tensors[f"{p}block_sparse_moe.experts.{e}.{name}.weight"] = (
                        w + 0.05 * randn(*w.shape, std=w.std().item()))
        tensors[p + "block_sparse_moe.gate.weight"] = router
    _save_sharded(directory, {k: v.to(dtype).contiguous() for k, v in tensors.items()})
    _write_config(directory, shape, vocab, dtype)
    return planted


def _save_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        shard = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_config(directory: Path, shape: DemoShape, vocab: int, dtype: torch.dtype) -> None:
    """config.json as the Hub's original Mixtral repos have it (rope_theta, torch_dtype)."""
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": vocab, "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "num_local_experts": shape.experts,
        "num_experts_per_tok": shape.top_k, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
        "sliding_window": None, "router_aux_loss_coef": 0.02, "output_router_logits": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def data_file(name: str) -> Path:
    return Path(str(resources.files("hcconvert") / "data" / name))


def run_demo(workdir: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        src = root / "planted-mixtral"
        planted = build_planted_mixtral(src)
        base = ConvertOptions(experts=4, calib=str(data_file("demo_calib.txt")),
                              calib_samples=16, seq_len=512, method="hc-smoe")
        variants = {"HC-SMoE": base,
                    "random grouping": dataclasses.replace(base, grouping="random"),
                    "F-prune (drop least used)": dataclasses.replace(base, method="f-prune"),
                    "auto (the default)": dataclasses.replace(base, method="auto")}
        results = compare(str(src), variants, data_file("demo_eval.txt"), root, seq_len=256,
                          samples=16, device="cpu")
        _print_report(planted, results)


def _print_report(planted, results: list[Result]) -> None:
    hc = results[0].conversion
    print("\nplanted vs recovered expert groups (HC-SMoE):")
    for groups, result in zip(planted, hc.layers, strict=True):
        mark = "ok" if groups == result.groups else "DIFFERENT"
        print(f"  layer {result.layer}: planted {groups}  recovered {result.groups}  {mark}")
    print(f"\nsize: {human_bytes(hc.plan.bytes_in)} -> {human_bytes(hc.plan.bytes_out)} "
          f"({hc.plan.spec.num_experts} -> {hc.plan.experts_out} experts per layer)")
    print("\n" + markdown_table(results))


if __name__ == "__main__":
    run_demo()
