"""Routed experts: the stacked weights of one MoE layer, and the module that runs them inside
transformers' MoE block while recording what the router chose.

T tokens, H hidden, E experts, F expert ffn, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .families import ExpertLayout, Fused


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """One expert: down(silu(gate(x)) * up(x)). Weights as nn.Linear stores them."""
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


def routed_outputs(x: torch.Tensor, experts: Experts, index: torch.Tensor):
    """For each expert e some token picked: (e, token, slot, output) with index[token, slot] = e
    and output = expert e on x[token]. x: [T, H]; index: [T, K]."""
    for e in range(len(experts)):
        token, slot = torch.where(index == e)
        if token.numel():
            yield e, token, slot, swiglu(x[token], experts.gate[e], experts.up[e], experts.down[e])


@dataclass
class RoutingRecord:
    """What a MoE block's router chose over every call: the block's inputs and each token's
    top-k experts and weights, in call order; with saliency, REAP's running sums (the routed
    weight times the norm of the expert's output, per expert) from the same forward.
    tokens: how many tokens the calls will bring in all (the inputs are written in place)."""

    tokens: int
    saliency: bool = False
    keep_output: bool = False  # keep the routed-expert output too (the layer fit's target)
    inputs: torch.Tensor | None = None  # [T, H]
    outputs: torch.Tensor | None = None  # [T, H] fp32, with keep_output
    index: list[torch.Tensor] = field(default_factory=list)  # [t, K] per call
    weights: list[torch.Tensor] = field(default_factory=list)  # [t, K] fp32 per call
    filled: int = 0
    saliency_sum: torch.Tensor | None = None  # [E] fp64
    picked: torch.Tensor | None = None  # [E] fp64

    def observe(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = x.new_empty((self.tokens, x.shape[1]))
        self.inputs[self.filled:self.filled + x.shape[0]] = x
        self.filled += x.shape[0]
        self.index.append(index)
        self.weights.append(weights.float())

    def observe_sum(self, out: torch.Tensor) -> None:
        """The routed-expert output of the tokens observe saw last."""
        if not self.keep_output:
            return
        if self.outputs is None:
            self.outputs = out.new_empty((self.tokens, out.shape[1]), dtype=torch.float32)
        self.outputs[self.filled - out.shape[0]:self.filled] = out

    def routing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs [T, H], top-k index [T, K] and weights [T, K] of every token."""
        if self.filled != self.tokens:
            raise RuntimeError(f"the layer saw {self.filled} of {self.tokens} tokens")
        return self.inputs, torch.cat(self.index), torch.cat(self.weights)

    def mean_saliency(self, experts: int) -> torch.Tensor:
        """[E] REAP's saliency: over the tokens routed to an expert, the mean routed weight
        times output norm; 0 for experts no token picked."""
        if self.saliency_sum is None:
            return torch.zeros(experts)
        return (self.saliency_sum / self.picked.clamp_min(1)).float()

    def observe_output(self, e: int, weight: torch.Tensor, out: torch.Tensor,
                       experts: int) -> None:
        if self.saliency_sum is None:
            self.saliency_sum = torch.zeros(experts, dtype=torch.float64, device=out.device)
            self.picked = torch.zeros(experts, dtype=torch.float64, device=out.device)
        self.saliency_sum[e] += (weight.float() * out.float().norm(dim=-1)).sum().double()
        self.picked[e] += out.shape[0]


class RoutedExperts(nn.Module):
    """Stands in for a transformers MoE block's experts: called as experts(x, index, weights)
    with x [T, H] and the router's top-k index and weights [T, K], returns Σ_k weight · expert."""

    def __init__(self, experts: Experts, record: RoutingRecord | None = None):
        super().__init__()
        self.stacked, self.record = experts, record

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        record = self.record
        if record is not None:
            record.observe(x, index, weights)
        out = torch.zeros_like(x)
        for e, token, slot, y in routed_outputs(x, self.stacked, index):
            weight = weights[token, slot, None]
            out.index_add_(0, token, (y * weight).to(x.dtype))
            if record is not None and record.saliency:
                record.observe_output(e, weight[:, 0], y, len(self.stacked))
        if record is not None:
            record.observe_sum(out)
        return out
