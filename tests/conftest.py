"""Shared fixtures: tiny Mixtral checkpoints saved by transformers, with a tokenizer and text.

Triton kernels run under the interpreter on machines without CUDA; the variable must be set
before triton decorates any kernel, hence here, before the package is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hcconvert.cli.demo import data_file, write_tokenizer  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
            max_position_embeddings=512, rms_norm_eps=1e-5)


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


@pytest.fixture(autouse=True)
def restore_hub_offline_switch(monkeypatch):
    """The CLI switches huggingface_hub to offline mode when the Hub is unreachable; undo that
    after each test, so no test depends on the ones before it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)


@pytest.fixture(autouse=True)
def cpu_without_matrix_unit(monkeypatch):
    """auto computes in fp32 on the CPU in every test, as on a CPU without AMX: the results
    must not depend on the machine running the suite (tests that want bf16 ask for it)."""
    from hcconvert.model import decoder

    monkeypatch.setattr(decoder, "half_is_fast", lambda dtype: False)


@pytest.fixture
def calib_text() -> Path:
    return data_file("demo_calib.txt")


@pytest.fixture
def eval_text() -> Path:
    return data_file("demo_eval.txt")


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file below directory, keyed by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (tests only: small models)."""
    from safetensors.torch import load_file

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
