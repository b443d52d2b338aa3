"""Tiny checkpoints and reading them back: a random Mixtral saved by transformers (and the
names of its experts and router), one tensor rewritten in its shard, every tensor of a
checkpoint, the digests of its files and the logits stock transformers computes from it."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hcconvert.cli.demo import write_tokenizer

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
            max_position_embeddings=512, rms_norm_eps=1e-5)

# A tiny Mixtral's tensor names; layer, e (expert) and w (w1, w2, w3) to fill in.
EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"


def save_tiny_mixtral(directory: Path, dtype=torch.float32, hub_style_config=False,
                      seed=0, **overrides) -> Path:
    """A random MixtralForCausalLM saved by transformers in several shards, plus a tokenizer.

    hub_style_config rewrites config.json the way the Hub's original repos have it
    (rope_theta and torch_dtype instead of transformers 5's rope_parameters and dtype).
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    config = MixtralConfig(vocab_size=vocab, **{**TINY, **overrides})
    model = MixtralForCausalLM(config).to(dtype)
    _spread_weights(model)
    model.save_pretrained(directory, max_shard_size="40KB")
    if hub_style_config:
        cfg = json.loads((directory / "config.json").read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def _spread_weights(model) -> None:
    """transformers' init (std 0.02) makes every expert's output near zero and every router
    row alike; unit-variance-ish weights make routing and merging differences visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5 * (4 if "gate" in name.split(".")[-2:] else 1))
            if "embed" in name:
                p.normal_(0, 1)


def rewrite_tensor(src, name, change, new_name=None):
    """Replace tensor `name` in its shard by change(tensor), stored as new_name (default: the
    same name); change returning None drops it."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    new = change(tensors[name])
    if new_name is None:
        del tensors[name], index["weight_map"][name]
    if new is not None:
        tensors[new_name or name] = new
        index["weight_map"][new_name or name] = shard.name
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file below directory, keyed by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (tests only: small models)."""
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def logits_of(directory: Path, tokens: torch.Tensor, auto_class=None) -> torch.Tensor:
    """Logits of the checkpoint as stock transformers loads it (auto_class: default
    AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits
