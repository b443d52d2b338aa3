"""config.json's values, checked by type and range before anything is built from them.

The geometry keys size lists, plans and tensors (one entry per layer, one name per expert), so
an absurd value must be refused here, by name, rather than end in a MemoryError minutes later;
a string or float where a count belongs must not reach arithmetic. The bounds are far above
any released model and far below what would exhaust memory.
"""

from __future__ import annotations

import math

from .errors import UserError

MAX_LAYERS = 10_000
MAX_EXPERTS = 1 << 16
MAX_WIDTH = 1 << 22  # hidden and intermediate sizes, ranks, head dimensions
MAX_HEADS = 1 << 16
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 32

# key -> (least, greatest) for integer values; None is allowed wherever a key is optional.
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_WIDTH),
    "moe_intermediate_size": (1, MAX_WIDTH),
    "shared_expert_intermediate_size": (1, MAX_WIDTH),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_WIDTH),
    "num_local_experts": (1, MAX_EXPERTS),
    "num_experts": (1, MAX_EXPERTS),
    "n_routed_experts": (1, MAX_EXPERTS),
    "n_shared_experts": (0, MAX_EXPERTS),
    "num_experts_per_tok": (1, MAX_EXPERTS),
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
    "qk_rope_head_dim": (1, MAX_WIDTH),
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


def check_config(config: object) -> None:
    """Raise UserError naming the first key of config.json whose value hcconvert cannot use."""
    if not isinstance(config, dict):
        raise UserError(f"config.json holds a JSON {json_type(config)}, not an object")
    for key, (least, greatest) in INTEGER_RANGES.items():
        _check_integer(config, key, least, greatest)
    _check_values(config)
    for key in OBJECT_KEYS:
        _check_kind(config, key, dict, "an object")
        _check_values(config.get(key) or {}, f"{key}.")
    _check_layer_list(config, "mlp_only_layers")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise UserError(f"config.json: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")


def _check_values(config: dict, within: str = "") -> None:
    """The number, flag and text keys of config.json, or of its RoPE object `within`."""
    numbers, flags, texts = ((ROPE_NUMBER_KEYS, (), ROPE_TEXT_KEYS) if within
                             else (NUMBER_KEYS, FLAG_KEYS, TEXT_KEYS))
    for key in numbers:
        value = config.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            _refuse(within + key, value, "a finite number")
    for key in flags:
        _check_kind(config, key, bool, "true or false")
    for key in texts:
        _check_kind(config, key, str, "a string", within)


def _check_integer(config: dict, key: str, least: int, greatest: int) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        _refuse(key, value, "an integer")
    if not least <= value <= greatest:
        _refuse(key, value, f"an integer from {least} to {greatest}")


def _check_kind(config: dict, key: str, kind: type, wanted: str, within: str = "") -> None:
    value = config.get(key)
    if value is not None and not isinstance(value, kind):
        _refuse(within + key, value, wanted)


def _check_layer_list(config: dict, key: str) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_LAYERS
            for v in value):
        _refuse(key, value, "a list of layer numbers")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _refuse(key: str, value: object, wanted: str):
    shown = repr(value) if _is_number(value) or isinstance(value, str) else json_type(value)
    raise UserError(f"config.json: {key} is {shown[:40]}, expected {wanted}")


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
