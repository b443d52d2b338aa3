"""Our own decoder forward, one layer at a time (transformers is a test dependency only).

Shapes: N sequences, S tokens each, T = N*S tokens, H hidden, E experts, F expert ffn, K top-k.
A layer's weights arrive as a dict keyed by the family's suffix names (families.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .families import ExpertNames, Family

# Sequences per attention call: bounds the [heads, S, S] scores of the math SDPA backend on CPU.
ATTENTION_BATCH = 4
# Tokens per chunk in the routed expert forward.
MOE_CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class ModelSpec:
    """The geometry and routing settings one conversion needs, read from config.json."""

    family: Family
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    num_experts: int
    top_k: int
    renormalize: bool
    tie_embeddings: bool
    moe_layers: tuple[int, ...]

    @classmethod
    def from_config(cls, config: dict, family: Family) -> ModelSpec:
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        return cls(
            family=family,
            num_layers=layers,
            hidden=config["hidden_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=_rope_theta(config),
            rms_eps=config.get("rms_norm_eps", 1e-6),
            num_experts=config[family.experts_key],
            top_k=config[family.top_k_key],
            renormalize=family.renormalizes(config),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(i for i in range(layers) if family.is_moe_layer(config, i)),
        )


def _rope_theta(config: dict) -> float:
    """transformers 5 writes `rope_parameters`; the Hub's original repos have `rope_theta`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"rope_type {rope_type!r} is not supported yet (only default RoPE)")
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(spec: ModelSpec, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (spec.rope_theta ** (exponents / spec.head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _project(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    bias = w.get(f"self_attn.{name}.bias")
    return F.linear(x, w[f"self_attn.{name}.weight"], bias)


def attention(spec: ModelSpec, w: dict, x: torch.Tensor, rope) -> torch.Tensor:
    """Causal grouped-query self-attention with RoPE. x: [N, S, H] (already normed)."""
    n, s, _ = x.shape
    q = _project(x, w, "q_proj")
    k = _project(x, w, "k_proj")
    if spec.family.qk_norm == "proj":
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_eps)
    q = q.view(n, s, spec.heads, spec.head_dim)
    k = k.view(n, s, spec.kv_heads, spec.head_dim)
    v = _project(x, w, "v_proj").view(n, s, spec.kv_heads, spec.head_dim).transpose(1, 2)
    if spec.family.qk_norm == "head":
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_eps)
    cos, sin = rope[0][:s], rope[1][:s]
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [N, heads, S, D]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         enable_gqa=spec.kv_heads != spec.heads)
    return F.linear(out.transpose(1, 2).reshape(n, s, -1), w["self_attn.o_proj.weight"])


def attention_residual(spec: ModelSpec, w: dict, h: torch.Tensor, rope) -> torch.Tensor:
    """h + attention(norm(h)), in batches of sequences. h: [N, S, H]."""
    out = torch.empty_like(h)
    for start in range(0, h.shape[0], ATTENTION_BATCH):
        chunk = h[start:start + ATTENTION_BATCH]
        normed = rms_norm(chunk, w["input_layernorm.weight"], spec.rms_eps)
        out[start:start + ATTENTION_BATCH] = chunk + attention(spec, w, normed, rope)
    return out


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
    def from_layer(cls, w: dict, names: ExpertNames, count: int) -> Experts:
        def stack(template: str) -> torch.Tensor:
            return torch.stack([w[template.format(expert=e)] for e in range(count)])

        return cls(stack(names.gate), stack(names.up), stack(names.down))

    def __len__(self) -> int:
        return self.gate.shape[0]


def route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """softmax over all experts in fp32, then top-k (with optional renormalisation)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


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
    top_k = min(spec.top_k, len(experts))
    for start in range(0, x.shape[0], MOE_CHUNK_TOKENS):
        chunk = x[start:start + MOE_CHUNK_TOKENS]
        weights, index = route(F.linear(chunk, router), top_k, spec.renormalize)
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
    names = spec.family.dense_mlp
    return swiglu(x, w[names.gate], w[names.up], w[names.down])


def decoder_layer(spec: ModelSpec, layer: int, w: dict, h: torch.Tensor, rope) -> torch.Tensor:
    """One full decoder layer as the checkpoint defines it. h: [N, S, H]."""
    h = attention_residual(spec, w, h, rope)
    flat = h.view(-1, spec.hidden)
    x = ffn_input(spec, w, flat)
    if layer in spec.moe_layers:
        experts = Experts.from_layer(w, spec.family.experts, spec.num_experts)
        flat += moe_block(spec, w, x, w[spec.family.router], experts)
    else:
        flat += dense_mlp(spec, w, x)
    return h


def final_logits(spec: ModelSpec, norm: torch.Tensor, lm_head: torch.Tensor,
                 h: torch.Tensor) -> torch.Tensor:
    return F.linear(rms_norm(h, norm, spec.rms_eps), lm_head).float()
