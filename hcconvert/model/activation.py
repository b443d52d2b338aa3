"""How a routed expert turns its gate and up projections into its ffn activations.

- silu: silu(gate) · up (SwiGLU), most families.
- clamped_swiglu: GPT-OSS's, gate clamped above at `limit`, up to ±`limit`, then
  gate · sigmoid(alpha · gate) · (up + 1).
- clamped_silu: DeepSeek-V4's, Hy-V4's and GLM-5-Next's, silu(gate clamped above at `limit`)
  · (up clamped to ±`limit`).
- silu_clamped: Ling-2.5's (bailing_hybrid) and Step-3.5's, silu(gate) clamped above at
  `limit`, times up clamped to ±`limit`; the limit set per layer (0: plain silu).
- gelu_tanh: Gemma 4's, gelu(gate, tanh approximation) · up (GeGLU).
- relu2: Nemotron-H's ungated experts, relu(up)², with no gate.

A family's activation is a function of the transformers config and the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    # "silu", "clamped_swiglu", "clamped_silu", "silu_clamped", "gelu_tanh" or "relu2"
    name: str = "silu"
    alpha: float = 0.0  # clamped_swiglu only
    limit: float = 0.0  # the clamped kinds only

    def __call__(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(gate) * up
        if self.name == "relu2":
            return F.relu(up).square()
        if self.name == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        if self.name == "clamped_silu":
            return F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit,
                                                                 max=self.limit)
        if self.name == "silu_clamped":
            return F.silu(gate).clamp(max=self.limit) * up.clamp(min=-self.limit,
                                                                 max=self.limit)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)

    def in_fp32(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The activations in fp32 from gate and up products of any dtype, the same values as
        self(gate.float(), up.float()). Consumes gate: SwiGLU works in place in its fp32 copy
        (gate itself when fp32), sparing two [t, F] temporaries per product (measured 23 %
        faster on the CPU summing pass, docs/BENCHMARKS.md)."""
        if self.name != "silu":
            return self(None if gate is None else gate.float(), up.float())
        return F.silu(gate.float(), inplace=True).mul_(up)


SILU = Activation()
RELU2 = Activation("relu2")


def silu(config, layer: int) -> Activation:
    return SILU


def relu2(config, layer: int) -> Activation:
    return RELU2


def gelu_tanh(config, layer: int) -> Activation:
    return Activation("gelu_tanh")


def clamped_swiglu(config, layer: int) -> Activation:
    """GPT-OSS's, with alpha and limit from the transformers config (swiglu_alpha/_limit)."""
    return Activation("clamped_swiglu", config.swiglu_alpha, config.swiglu_limit)


def clamped_silu(config, layer: int) -> Activation:
    """SiLU with both products clamped at the transformers config's swiglu_limit."""
    return Activation("clamped_silu", limit=config.swiglu_limit)


def silu_clamped_per_layer(config, layer: int) -> Activation:
    """silu_clamped at the layer's entry of the transformers config's swiglu_limits (none
    or 0: plain SiLU, as transformers reads them)."""
    limits = config.swiglu_limits
    return Activation("silu_clamped", limit=limits[layer]) if limits and limits[layer] \
        else SILU
