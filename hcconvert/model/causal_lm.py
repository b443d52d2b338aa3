"""The text model of a config as a causal LM, built by transformers: the class the auto
classes map the config to, else the one its package defines for it (Mistral-4's), else, for
the text half of a vision-language model that has no causal-LM class of its own (GLM-4.5V's,
Qwen3-VL's), the text model with the LM head its wrapper puts on top.

V vocabulary, H hidden.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


def causal_lm(config, dtype: torch.dtype) -> nn.Module:
    """A model with `.model` (the text model, `.layers` its decoder layers), `.lm_head`,
    `.config`, whose forward(input_ids=..., use_cache=False) returns `.logits`."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    own = _package_class(config, "ForCausalLM", same_config=True)
    if own is not None:
        return own._from_config(config, dtype=dtype)
    if config.model_type in MODEL_MAPPING_NAMES:
        return TextWithHead(AutoModel.from_config(config, dtype=dtype), config)
    # No auto class knows the text config at all (Step-3.7's step3p5): its package's text
    # model, which the wrapper builds by name.
    text_model = _package_class(config, "TextModel")
    if text_model is None:
        raise ValueError(f"transformers builds no text model for {config.model_type}")
    return TextWithHead(text_model._from_config(config, dtype=dtype), config)


def _package_class(config, suffix: str, same_config: bool = False):
    """The one class of the config's own package named `*{suffix}` (built from exactly this
    config class with same_config: Mistral4ForCausalLM, which no auto class maps), or None."""
    package = importlib.import_module(type(config).__module__.rsplit(".", 1)[0])
    found = [cls for name in dir(package) if name.endswith(suffix)
             for cls in [getattr(package, name)]
             if not same_config or getattr(cls, "config_class", None) is type(config)]
    return found[0] if len(found) == 1 else None


@dataclass
class TextOutput:
    logits: torch.Tensor  # [N, S, V]


class TextWithHead(nn.Module):
    """A vision-language wrapper's text model and LM head, as its forward runs them on text:
    logits = lm_head(text_model(input_ids)), the head a bias-free [V, H] linear, soft-capped
    where the text config says so (Mistral-Large-4's final_logit_softcapping: c·tanh(z/c));
    the parity tests hold each family's wrapper to it."""

    base_model_prefix = "model"  # where transformers' weight renamings find the text model

    def __init__(self, text_model: nn.Module, config):
        super().__init__()
        self.model, self.config = text_model, config
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                 dtype=text_model.dtype)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> TextOutput:
        hidden = self.model(input_ids=input_ids, use_cache=use_cache).last_hidden_state
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return TextOutput(logits if cap is None else cap * torch.tanh(logits / cap))
