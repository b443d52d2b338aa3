"""How a routed expert turns its gate and up projections into its ffn activations.

- silu: silu(gate) · up (SwiGLU), every family but GPT-OSS.
- clamped_swiglu: GPT-OSS's, gate clamped above at `limit`, up to ±`limit`, then
  gate · sigmoid(alpha · gate) · (up + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str = "silu"  # "silu" or "clamped_swiglu"
    alpha: float = 0.0  # clamped_swiglu only
    limit: float = 0.0  # clamped_swiglu only

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


SILU = Activation()


def silu(config) -> Activation:
    return SILU


def clamped_swiglu(config) -> Activation:
    """GPT-OSS's, with alpha and limit from the transformers config (swiglu_alpha/_limit)."""
    return Activation("clamped_swiglu", config.swiglu_alpha, config.swiglu_limit)
