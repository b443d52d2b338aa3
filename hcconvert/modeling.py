"""Our own decoder forward, one layer at a time (transformers is a test dependency only).

Shapes: N sequences, S tokens each, T = N*S tokens, H hidden, E experts, F expert ffn, K top-k.
A layer's weights arrive as a dict keyed by the family's suffix names (families.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import rope as rotary
from .errors import UserError
from .families import ExpertLayout, ExpertNames, Family, Fused, read_flag

# Sequences per attention call: bounds the [heads, S, S] scores of the math SDPA backend on CPU.
ATTENTION_BATCH = 4
# Tokens per chunk in the routed expert forward.
MOE_CHUNK_TOKENS = 8192
# DeepSeek's q_a/kv_a RMSNorms use their class default eps, not rms_norm_eps.
MLA_NORM_EPS = 1e-6


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

    @property
    def renormalize(self) -> bool:
        return self.routing.renormalize

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(spec: ModelSpec, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, rope dim], in the dtype the family rotates in."""
    # DeepSeek rotates in fp32 (as complex numbers); the others in the model's dtype.
    table_dtype = torch.float32 if spec.family.attention == "mla" else dtype
    return rotary.rope_tables(spec.rope, seq_len, device, table_dtype)


def embed(spec: ModelSpec, table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The first hidden states [N, S, H] of tokens [N, S]."""
    hidden = table[tokens]
    return hidden * spec.embedding_scale if spec.embedding_scale != 1.0 else hidden


def _project(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    bias = w.get(f"self_attn.{name}.bias")
    return F.linear(x, w[f"self_attn.{name}.weight"], bias)


def gqa_attention(spec: ModelSpec, w: dict, x: torch.Tensor, rope) -> torch.Tensor:
    """Causal grouped-query self-attention with RoPE. x: [N, S, H] (already normed)."""
    n, s, _ = x.shape
    q, k, v = (_project(x, w, p) for p in ("q_proj", "k_proj", "v_proj"))
    if spec.family.qk_norm == "proj":
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = q.view(n, s, spec.heads, spec.head_dim)
    k = k.view(n, s, spec.kv_heads, spec.head_dim)
    v = v.view(n, s, spec.kv_heads, spec.head_dim).transpose(1, 2)
    if spec.family.qk_norm == "head":
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_eps)
    cos, sin = rope[0][:s], rope[1][:s]
    q = rotary.apply_rope(q.transpose(1, 2), cos, sin)  # [N, heads, S, D]
    k = rotary.apply_rope(k.transpose(1, 2), cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.attention_scale,
                                         enable_gqa=spec.kv_heads != spec.heads)
    return _project(out.transpose(1, 2).reshape(n, s, -1), w, "o_proj")


def mla_attention(spec: ModelSpec, w: dict, x: torch.Tensor, rope) -> torch.Tensor:
    """DeepSeek's latent attention: keys and values from a normed low-rank latent, plus one
    rotary key part shared by all heads. x: [N, S, H] (already normed)."""
    n, s, _ = x.shape
    m = spec.mla
    if m.q_lora_rank is None:
        q = _project(x, w, "q_proj")
    else:
        latent_q = rms_norm(_project(x, w, "q_a_proj"), w["self_attn.q_a_layernorm.weight"],
                            MLA_NORM_EPS)
        q = _project(latent_q, w, "q_b_proj")
    q_nope, q_rot = q.view(n, s, spec.heads, -1).transpose(1, 2).split([m.nope_dim, m.rope_dim],
                                                                      dim=-1)
    latent, k_rot = _project(x, w, "kv_a_proj_with_mqa").split([m.kv_lora_rank, m.rope_dim], -1)
    latent = rms_norm(latent, w["self_attn.kv_a_layernorm.weight"], MLA_NORM_EPS)
    kv = _project(latent, w, "kv_b_proj").view(n, s, spec.heads, -1).transpose(1, 2)
    k_nope, v = kv.split([m.nope_dim, m.v_dim], dim=-1)
    cos, sin = rope[0][:s], rope[1][:s]
    q_rot = rotary.apply_rope(rotary.deinterleave(q_rot).float(), cos, sin).to(x.dtype)
    k_rot = rotary.apply_rope(rotary.deinterleave(k_rot.view(n, 1, s, m.rope_dim)).float(),
                              cos, sin).to(x.dtype)
    q = torch.cat((q_nope, q_rot), dim=-1)
    k = torch.cat((k_nope, k_rot.expand(-1, spec.heads, -1, -1)), dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.attention_scale)
    return _project(out.transpose(1, 2).reshape(n, s, -1), w, "o_proj")


ATTENTIONS = {"gqa": gqa_attention, "mla": mla_attention}


def attention(spec: ModelSpec, w: dict, x: torch.Tensor, rope) -> torch.Tensor:
    return ATTENTIONS[spec.family.attention](spec, w, x, rope)


def add_residual(spec: ModelSpec, h: torch.Tensor, branch: torch.Tensor) -> None:
    """h += branch, in place, scaled by the family's residual multiplier (Granite)."""
    h += branch * spec.residual_scale if spec.residual_scale != 1.0 else branch


def attention_residual(spec: ModelSpec, w: dict, h: torch.Tensor, rope) -> torch.Tensor:
    """h + attention(norm(h)), in batches of sequences, updating h in place (each batch's
    attention reads only its own sequences; a copy would cost [T, H] more). h: [N, S, H]."""
    for start in range(0, h.shape[0], ATTENTION_BATCH):
        chunk = h[start:start + ATTENTION_BATCH]
        normed = rms_norm(chunk, w["input_layernorm.weight"], spec.rms_eps)
        add_residual(spec, chunk, attention(spec, w, normed, rope))
    return h


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """One expert (or dense MLP): down(silu(gate(x)) * up(x)). Weights as nn.Linear stores them."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@dataclass
class Experts:
    """One MoE block's routed experts, stacked. gate, up: [E, F, H]; down: [E, H, F]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_layer(cls, w: dict, layout: ExpertLayout, count: int, device=None,
                   dtype: torch.dtype | None = None) -> Experts:
        """Read the experts whichever way the checkpoint stores them, onto device and dtype
        (default: where and as w holds them)."""
        if isinstance(layout, Fused):
            gate, up = w[layout.gate_up].chunk(2, dim=1)
            return cls(gate, up, w[layout.down]).to(device, dtype)

        def stack(template: str) -> torch.Tensor:
            # Straight into the destination, expert by expert: no host-side stacked copy, and
            # pinned sources copy to the GPU asynchronously.
            first = w[template.format(expert=0)]
            out = torch.empty((count, *first.shape), dtype=dtype or first.dtype,
                              device=device or first.device)
            for e in range(count):
                out[e].copy_(w[template.format(expert=e)], non_blocking=True)
            return out

        names = layout.names
        return cls(stack(names.gate), stack(names.up), stack(names.down))

    def to_layer(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """The tensors to store, in the layout read (per-expert names renumbered 0..E-1)."""
        if isinstance(layout, Fused):
            return {layout.gate_up: torch.cat((self.gate, self.up), dim=1),
                    layout.down: self.down}
        out = {}
        for e in range(len(self)):
            for template, stacked in zip(layout.names.all(), (self.gate, self.up, self.down),
                                         strict=True):
                out[template.format(expert=e)] = stacked[e]
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> Experts:
        return Experts(*(t.to(device=device, dtype=dtype) for t in (self.gate, self.up,
                                                                       self.down)))

    def __len__(self) -> int:
        return self.gate.shape[0]


def router_logits(x: torch.Tensor, router: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, E] fp32 logits; computed from fp32 operands where the family does (a bf16 matmul
    can flip near-tied top-k choices)."""
    if routing.fp32_logits:
        return F.linear(x.float(), router.float())
    return F.linear(x, router).float()


def route(logits: torch.Tensor, routing: Routing):
    """softmax over all experts in fp32, top-k (within the best groups, when the family routes
    by groups), optional renormalisation, then the routed scaling factor."""
    scores = torch.softmax(logits.float(), dim=-1)
    if routing.groups > 1:
        scores = _mask_to_top_groups(scores, routing)
    weights, index = torch.topk(scores, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routing.scale, index


def _mask_to_top_groups(scores: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Zero every expert outside the token's `top_groups` groups (ranked by their best score)."""
    grouped = scores.view(scores.shape[0], routing.groups, -1)
    best = torch.topk(grouped.max(dim=-1).values, routing.top_groups, dim=-1).indices
    keep = torch.zeros_like(grouped[..., 0]).scatter_(1, best, 1.0).bool()
    return grouped.masked_fill(~keep[..., None], 0.0).view_as(scores)


def routed_experts(x: torch.Tensor, experts: Experts, weights: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Sum of each token's top-k experts' outputs, weighted. x: [T, H]; weights, index: [T, K]."""
    out = torch.zeros_like(x)
    for e in range(len(experts)):
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        y = swiglu(x[token], experts.gate[e], experts.up[e], experts.down[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out


def moe_block(spec: ModelSpec, w: dict, x: torch.Tensor, router: torch.Tensor,
              experts: Experts) -> torch.Tensor:
    """The MoE block's output for tokens x: [T, H], with the given router and experts."""
    out = torch.empty_like(x)
    routing = spec.routing.for_experts(len(experts))
    for start in range(0, x.shape[0], MOE_CHUNK_TOKENS):
        chunk = x[start:start + MOE_CHUNK_TOKENS]
        weights, index = route(router_logits(chunk, router, routing), routing)
        out[start:start + MOE_CHUNK_TOKENS] = routed_experts(chunk, experts, weights, index)
    shared = spec.family.shared_expert
    if shared is not None:
        y = swiglu(x, w[shared.gate], w[shared.up], w[shared.down])
        if spec.family.shared_expert_gate is not None:
            y = torch.sigmoid(F.linear(x, w[spec.family.shared_expert_gate])) * y
        out += y
    return out


def ffn_input(spec: ModelSpec, w: dict, h: torch.Tensor) -> torch.Tensor:
    """The MoE/MLP input: post-attention RMSNorm of the residual stream. h: [T, H]."""
    return rms_norm(h, w["post_attention_layernorm.weight"], spec.rms_eps)


def dense_mlp(spec: ModelSpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    names: ExpertNames = spec.family.dense_mlp
    return swiglu(x, w[names.gate], w[names.up], w[names.down])


def decoder_layer(spec: ModelSpec, layer: int, w: dict, h: torch.Tensor, rope) -> torch.Tensor:
    """One full decoder layer as the checkpoint defines it. h: [N, S, H]."""
    h = attention_residual(spec, w, h, rope)
    flat = h.view(-1, spec.hidden)
    x = ffn_input(spec, w, flat)
    if layer in spec.moe_layers:
        experts = Experts.from_layer(w, spec.family.experts, spec.num_experts)
        add_residual(spec, flat, moe_block(spec, w, x, w[spec.family.router], experts))
    else:
        add_residual(spec, flat, dense_mlp(spec, w, x))
    return h


def final_logits(spec: ModelSpec, norm: torch.Tensor, lm_head: torch.Tensor,
                 h: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rms_norm(h, norm, spec.rms_eps), lm_head).float()
    return logits / spec.logits_divisor if spec.logits_divisor != 1.0 else logits
