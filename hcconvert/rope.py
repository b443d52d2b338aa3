"""Rotary position embeddings as transformers computes them: default RoPE and YaRN.

Read from config.json either way it may be written: transformers 5's `rope_parameters`, or the
Hub's original `rope_theta` plus `rope_scaling` (`"type": "yarn"`, as DeepSeek-V2 has it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Yarn:
    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Rope:
    theta: float
    dim: int  # rotated dimensions per head
    yarn: Yarn | None = None


def rope_parameters(config: dict) -> dict:
    """The RoPE settings with `rope_type` and `rope_theta` filled in, from either spelling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params["rope_theta"] = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    return params


def rope_from_config(config: dict, dim: int) -> Rope:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return Rope(params["rope_theta"], dim)
    if rope_type != "yarn":
        raise UserError(f"rope_type {rope_type!r} is not supported yet (default and yarn are)")
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 style).
    max_positions = config.get("max_position_embeddings")
    original = (config.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings") or max_positions)
    if not original:
        raise UserError("yarn RoPE needs original_max_position_embeddings in config.json")
    factor = params.get("factor") or (max_positions or original) / original
    yarn = Yarn(float(factor), int(original), params.get("beta_fast") or 32.0,
                params.get("beta_slow") or 1.0, params.get("mscale"),
                params.get("mscale_all_dim"), params.get("attention_factor"),
                params.get("truncate", True))
    return Rope(params["rope_theta"], dim, yarn)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: Rope) -> tuple[torch.Tensor, float]:
    """[dim/2] inverse frequencies and the factor transformers multiplies cos and sin by."""
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim
    pos_freqs = rope.theta ** exponents
    if rope.yarn is None:
        return 1.0 / pos_freqs, 1.0
    yarn = rope.yarn
    low, high = _correction_range(rope, yarn)
    if low == high:
        high += 0.001  # the ramp's singularity, avoided as transformers does
    ramp = ((torch.arange(rope.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # high-frequency dimensions keep their original frequency
    inv_freq = (1.0 / (yarn.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, _attention_factor(yarn)


def _correction_range(rope: Rope, yarn: Yarn) -> tuple[float, float]:
    def dimension(rotations: float) -> float:
        return (rope.dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = dimension(yarn.beta_fast), dimension(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rope.dim - 1)


def _attention_factor(yarn: Yarn) -> float:
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def rope_tables(rope: Rope, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, dim] for positions 0..S-1, in rotate-half order."""
    inv_freq, factor = inverse_frequencies(rope)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return ((emb.cos() * factor).to(device, dtype), (emb.sin() * factor).to(device, dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., S, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Reorder interleaved rotary pairs (0,1),(2,3).. into rotate-half order (0,d/2),(1,d/2+1)..

    Applied to both queries and keys, this permutation leaves q·k unchanged, so interleaved RoPE
    (DeepSeek's complex-number form) becomes the rotate-half RoPE of apply_rope.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
