"""config.json's values, checked by type and range before anything is built from them.

The geometry keys size lists, plans and tensors (one entry per layer, one name per expert), so
an absurd value must be refused here, by name, rather than end in a MemoryError minutes later;
a string or float where a count belongs must not reach arithmetic. The bounds are far above
any released model and far below what would exhaust memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import UserError
from ..io.headers import json_type

MAX_LAYERS = 10_000
MAX_EXPERTS = 1 << 16
MAX_WIDTH = 1 << 22  # hidden and intermediate sizes, ranks, head dimensions
MAX_HEADS = 1 << 16
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 32

# key -> (least, greatest) for integer values; None is allowed wherever a key is optional. The
# family's own keys (expert count, top-k, expert width) come from its table entry (family_ranges).
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_WIDTH),
    "shared_expert_intermediate_size": (1, MAX_WIDTH),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    # 0: none (GLM-5-Next's MLA has no rotary part and no head_dim of its own).
    "head_dim": (0, MAX_WIDTH),
    "n_shared_experts": (0, MAX_EXPERTS),
    "n_group": (1, MAX_EXPERTS),
    "topk_group": (1, MAX_EXPERTS),
    "first_k_dense_replace": (0, MAX_LAYERS),
    "moe_layer_freq": (0, MAX_LAYERS),  # 0 reads as 1, as transformers does
    "decoder_sparse_step": (0, MAX_LAYERS),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "original_max_position_embeddings": (1, MAX_POSITIONS),
    "q_lora_rank": (1, MAX_WIDTH),
    "kv_lora_rank": (1, MAX_WIDTH),
    "qk_nope_head_dim": (1, MAX_WIDTH),
    "qk_rope_head_dim": (0, MAX_WIDTH),
    "v_head_dim": (1, MAX_WIDTH),
}
NUMBER_KEYS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "attention_multiplier",
               "embedding_multiplier", "residual_multiplier", "logits_scaling", "clip_qkv")
FLAG_KEYS = ("tie_word_embeddings", "use_sliding_window", "norm_topk_prob", "attention_bias",
             "qkv_bias")
TEXT_KEYS = ("model_type", "scoring_func", "topk_method")
OBJECT_KEYS = ("rope_scaling", "rope_parameters")
ROPE_NUMBER_KEYS = ("rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                    "attention_factor", "original_max_position_embeddings")
ROPE_TEXT_KEYS = ("rope_type", "type")


class ConfigValueError(UserError):
    """A config.json value hcconvert cannot use: refused wherever config.json is read, by
    `inspect` too (which describes an unsupported model instead of refusing it)."""


def check_model_type(config: dict) -> None:
    """config.json's model_type, which picks the family whose keys check_config then checks."""
    _check_kind(config, "model_type", str, "a string")


def check_config(config: dict, text_key: str | None,
                 family_ranges: Mapping[str, tuple[int, int]]) -> None:
    """Raise ConfigValueError naming the first key of config.json, or of the text config under
    text_key (a vision-language wrapper's), whose value hcconvert cannot use; family_ranges:
    the family's own integer keys (Family.config_ranges)."""
    ranges = {**INTEGER_RANGES, **family_ranges}
    if text_key is not None:
        _check_kind(config, text_key, dict, "an object")
    places = [(config, "")]
    if isinstance(config.get(text_key), dict):
        places.append((config[text_key], text_key + "."))
    for values, within in places:
        _check_place(values, within, ranges)


def _check_place(config: dict, within: str, ranges: dict[str, tuple[int, int]]) -> None:
    """One level of config.json: the top level, or a wrapper's text config (within: its key)."""
    for key, (least, greatest) in ranges.items():
        _check_integer(config, key, least, greatest, within)
    _check_values(config, within, rope=False)
    for key in OBJECT_KEYS:
        _check_kind(config, key, dict, "an object", within)
        _check_values(config.get(key) or {}, f"{within}{key}.", rope=True)
    _check_layer_list(config, "mlp_only_layers", within)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigValueError(f"config.json: {within}num_attention_heads {heads} is not a "
                               f"multiple of {within}num_key_value_heads {kv_heads}")


def _check_values(config: dict, within: str, rope: bool) -> None:
    """The number, flag and text keys of one level of config.json, or of a RoPE object."""
    numbers, flags, texts = ((ROPE_NUMBER_KEYS, (), ROPE_TEXT_KEYS) if rope
                             else (NUMBER_KEYS, FLAG_KEYS, TEXT_KEYS))
    for key in numbers:
        value = config.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            _refuse(within + key, value, "a finite number")
    for key in flags:
        _check_kind(config, key, bool, "true or false", within)
    for key in texts:
        _check_kind(config, key, str, "a string", within)


def _check_integer(config: dict, key: str, least: int, greatest: int, within: str) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        _refuse(within + key, value, "an integer")
    if not least <= value <= greatest:
        _refuse(within + key, value, f"an integer from {least} to {greatest}")


def _check_kind(config: dict, key: str, kind: type, wanted: str, within: str = "") -> None:
    value = config.get(key)
    if value is not None and not isinstance(value, kind):
        _refuse(within + key, value, wanted)


def _check_layer_list(config: dict, key: str, within: str) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_LAYERS
            for v in value):
        _refuse(within + key, value, "a list of layer numbers")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _refuse(key: str, value: object, wanted: str):
    shown = repr(value) if _is_number(value) or isinstance(value, str) else json_type(value)
    raise ConfigValueError(f"config.json: {key} is {shown[:40]}, expected {wanted}")
