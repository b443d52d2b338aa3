"""Our own decoder forward, one layer at a time (transformers is a test dependency only).

Shapes: N sequences, S tokens each, T = N*S tokens, H hidden, E experts, F expert ffn, K top-k.
A layer's weights arrive as a dict keyed by the family's suffix names (families.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import rope as rotary
from .families import ExpertLayout, ExpertNames, Fused
from .spec import ModelSpec, Routing

# Sequences per attention call: bounds the [heads, S, S] scores of the math SDPA backend on CPU.
ATTENTION_BATCH = 4
# Tokens per chunk in the routed expert forward.
MOE_CHUNK_TOKENS = 8192
# DeepSeek's q_a/kv_a RMSNorms use their class default eps, not rms_norm_eps.
MLA_NORM_EPS = 1e-6


RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [S, rotary dim]


def compute_dtype(device: torch.device, source_dtype: torch.dtype) -> torch.dtype:
    """Half-precision weights compute in their dtype on the GPU; the CPU computes in fp32."""
    if device.type == "cuda" and source_dtype in (torch.bfloat16, torch.float16):
        return source_dtype
    return torch.float32


def start_stream(spec: ModelSpec, table: torch.Tensor, tokens: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, RopeTables, torch.dtype]:
    """The first layer's input [N, S, H] for tokens [N, S], the RoPE tables, and the compute
    dtype (from the embedding table's dtype)."""
    dtype = compute_dtype(device, table.dtype)
    hidden = embed(spec, table, tokens).to(device, dtype)
    return hidden, rope_tables(spec, tokens.shape[1], device, dtype), dtype


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


def routed_outputs(x: torch.Tensor, experts: Experts, index: torch.Tensor):
    """For each expert e some token picked: (e, token, slot, output) with index[token, slot] = e
    and output = expert e on x[token]. x: [T, H]; index: [T, K]."""
    for e in range(len(experts)):
        token, slot = torch.where(index == e)
        if token.numel():
            yield e, token, slot, swiglu(x[token], experts.gate[e], experts.up[e], experts.down[e])


def routed_experts(x: torch.Tensor, experts: Experts, weights: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Sum of each token's top-k experts' outputs, weighted. x: [T, H]; weights, index: [T, K]."""
    out = torch.zeros_like(x)
    for _, token, slot, y in routed_outputs(x, experts, index):
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
