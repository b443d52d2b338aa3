"""What one conversion needs to know about a model, read from its config.json: geometry,
routing and attention settings (ModelSpec), validated before any weight is read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import rope as rotary
from .errors import UserError
from .families import Family, read_flag


@dataclass(frozen=True)
class Routing:
    """How a token picks its experts: softmax, top-k (optionally within its best groups),
    optional renormalisation, then a constant factor on the weights."""

    top_k: int
    renormalize: bool
    scale: float = 1.0
    groups: int = 1  # contiguous expert groups (DeepSeek's n_group under group_limited_greedy)
    top_groups: int = 1  # groups a token may pick from (topk_group)
    fp32_logits: bool = False  # router logits from fp32 inputs and weights

    def for_experts(self, count: int) -> Routing:
        """The same routing over a reduced layer of `count` experts."""
        return dataclasses.replace(self, top_k=min(self.top_k, count))


@dataclass(frozen=True)
class Mla:
    """DeepSeek's multi-head latent attention dimensions."""

    q_lora_rank: int | None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int


@dataclass(frozen=True)
class ModelSpec:
    """The geometry and routing settings one conversion needs, read from config.json."""

    family: Family
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope: rotary.Rope
    rms_eps: float
    num_experts: int
    ffn: int  # one routed expert's intermediate size
    routing: Routing
    tie_embeddings: bool
    moe_layers: tuple[int, ...]
    attention_scale: float  # the softmax scale of q·k
    attention_bias: bool  # the family's biased_projections carry biases
    clip_qkv: float | None = None  # OLMoE clamps q, k and v to [-clip, clip]
    mla: Mla | None = None
    # Granite's multipliers on the embeddings, on every residual branch, and (dividing) logits.
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logits_divisor: float = 1.0

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @classmethod
    def from_config(cls, config: dict, family: Family) -> ModelSpec:
        if config.get("use_sliding_window"):
            raise UserError("config.json enables sliding-window attention (use_sliding_window), "
                            "which is not supported")
        heads = _required(config, "num_attention_heads")
        hidden = _required(config, "hidden_size")
        layers = _required(config, "num_hidden_layers")
        head_dim = config.get("head_dim") or hidden // heads
        mla = _mla(config) if family.attention == "mla" else None
        rope = rotary.rope_from_config(config, mla.rope_dim if mla else head_dim)
        spec = cls(
            family=family,
            num_layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=rope,
            rms_eps=config.get("rms_norm_eps") or 1e-6,
            num_experts=config[family.experts_key(config)],
            ffn=_required(config, family.ffn_key),
            routing=_routing(config, family),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(i for i in range(layers) if family.is_moe_layer(config, i)),
            attention_scale=_attention_scale(config, head_dim, mla, rope),
            attention_bias=read_flag(config, family.attention_bias),
            clip_qkv=config.get("clip_qkv"),
            mla=mla,
            # Only Granite's configs carry these keys; every other family leaves them at 1.
            embedding_scale=config.get("embedding_multiplier") or 1.0,
            residual_scale=config.get("residual_multiplier") or 1.0,
            logits_divisor=config.get("logits_scaling") or 1.0,
        )
        if not 1 <= spec.top_k <= spec.num_experts:
            raise UserError(f"config.json asks for top-{spec.top_k} routing over "
                            f"{spec.num_experts} experts")
        if mla is None and spec.heads * spec.head_dim != hidden and not config.get("head_dim"):
            raise UserError(f"config.json: {heads} attention heads do not divide hidden_size "
                            f"{hidden} and no head_dim is given")
        return spec


def _required(config: dict, key: str):
    if config.get(key) is None:
        raise UserError(f"config.json has no {key}")
    return config[key]


def _mla(config: dict) -> Mla:
    return Mla(config.get("q_lora_rank"), _required(config, "kv_lora_rank"),
               _required(config, "qk_nope_head_dim"), _required(config, "qk_rope_head_dim"),
               _required(config, "v_head_dim"))


def _routing(config: dict, family: Family) -> Routing:
    if config.get("scoring_func", "softmax") != "softmax":
        raise UserError(f"scoring_func {config['scoring_func']!r} is not supported (softmax is)")
    groups = top_groups = 1
    method = config.get("topk_method", "greedy")
    if family.group_routing and method == "group_limited_greedy":
        groups, top_groups = _required(config, "n_group"), _required(config, "topk_group")
    elif method != "greedy":
        raise UserError(f"topk_method {method!r} is not supported")
    scale = config.get(family.routed_scaling_key) if family.routed_scaling_key else None
    return Routing(_required(config, family.top_k_key), read_flag(config, family.renormalize),
                   float(scale or 1.0), groups, top_groups, family.fp32_router)


def _attention_scale(config: dict, head_dim: int, mla: Mla | None, rope: rotary.Rope) -> float:
    if mla is None:
        # Granite sets the scale outright; everyone else uses 1/sqrt(head_dim).
        return config.get("attention_multiplier") or head_dim ** -0.5
    scale = (mla.nope_dim + mla.rope_dim) ** -0.5
    yarn = rope.yarn
    if yarn is not None and yarn.mscale_all_dim:
        # DeepSeek: YaRN's mscale applies to the softmax too (once per q and k).
        scale *= rotary.yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale
