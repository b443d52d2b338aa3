"""Routed experts: the stacked weights of one MoE layer, and the module that runs them inside
transformers' MoE block while recording what the router chose.

T tokens, H hidden, E experts, F expert ffn, K top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .activation import SILU, Activation
from .families import ExpertLayout, Fused

# Each per-expert tensor's neuron (ffn) axis, below the expert axis: permuting neurons moves
# these together and leaves an expert's output unchanged. down_bias has none.
NEURON_AXIS = {"gate": 0, "up": 0, "gate_bias": 0, "up_bias": 0, "down": 1, "down_bias": None}
# Rows per product when the routed forward also sums activations over all tokens: bounds the
# fp32 temporaries at 3 x SUM_CHUNK_TOKENS x F (the statistics' own pass used 4096 too).
SUM_CHUNK_TOKENS = 4096


@dataclass
class Experts:
    """One MoE block's routed experts, stacked. gate, up: [E, F, H]; down: [E, H, F]; the
    optional biases (GPT-OSS) gate_bias, up_bias [E, F] and down_bias [E, H]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: Activation = SILU

    @classmethod
    def from_layer(cls, w: dict, layout: ExpertLayout, count: int, device=None,
                   dtype: torch.dtype | None = None, activation: Activation = SILU) -> Experts:
        """Read the experts whichever way the checkpoint stores them, onto device and dtype
        (default: where and as w holds them)."""
        if isinstance(layout, Fused):
            return _from_fused(w, layout, activation).to(device, dtype)

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
        return cls(stack(names.gate), stack(names.up), stack(names.down),
                   activation=activation)

    @classmethod
    def stacked(cls, members: list[dict[str, torch.Tensor]], activation: Activation) -> Experts:
        """Experts from one parts() dict per expert."""
        return cls(**{name: torch.stack([m[name] for m in members]) for name in members[0]},
                   activation=activation)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stacked tensors present, by field name (gate, up, down, then any biases)."""
        return {name: getattr(self, name) for name in NEURON_AXIS
                if getattr(self, name) is not None}

    def to_layer(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """The tensors to store, in the layout read (per-expert names renumbered 0..E-1)."""
        if isinstance(layout, Fused):
            return _to_fused(self, layout)
        out = {}
        for e in range(len(self)):
            for template, stacked in zip(layout.names.all(), (self.gate, self.up, self.down),
                                         strict=True):
                out[template.format(expert=e)] = stacked[e]
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> Experts:
        return dataclasses.replace(self, **{name: t.to(device=device, dtype=dtype)
                                            for name, t in self.parts().items()})

    def projections(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[t, F] expert e's gate and up projections of x [t, H], computed in x's dtype."""
        gate = F.linear(x, self.gate[e].to(x.dtype), _row(self.gate_bias, e, x.dtype))
        up = F.linear(x, self.up[e].to(x.dtype), _row(self.up_bias, e, x.dtype))
        return gate, up

    def hidden(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """[t, F] expert e's ffn activations on x [t, H], computed in x's dtype."""
        return self.activation(*self.projections(x, e))

    def down_projection(self, hidden: torch.Tensor, e: int) -> torch.Tensor:
        """[t, H] expert e's output from its ffn activations [t, F], in their dtype."""
        return F.linear(hidden, self.down[e].to(hidden.dtype),
                        _row(self.down_bias, e, hidden.dtype))

    def output(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """[t, H] expert e's output on x [t, H], computed in x's dtype."""
        return self.down_projection(self.hidden(x, e), e)

    def __len__(self) -> int:
        return self.gate.shape[0]


def _row(bias: torch.Tensor | None, e: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias[e].to(dtype)


def _split(fused: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up from a [E, 2F, ...] tensor: alternating rows, or gate rows first."""
    if interleaved:
        return fused[:, 0::2], fused[:, 1::2]
    return fused.chunk(2, dim=1)


def _join(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((gate, up), dim=2).flatten(1, 2)
    return torch.cat((gate, up), dim=1)


def _from_fused(w: dict, layout: Fused, activation: Activation) -> Experts:
    gate_up, down = w[layout.gate_up], w[layout.down]
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = _split(gate_up, layout.interleaved)
    biases = {}
    if layout.gate_up_bias is not None:
        biases["gate_bias"], biases["up_bias"] = _split(w[layout.gate_up_bias],
                                                        layout.interleaved)
    if layout.down_bias is not None:
        biases["down_bias"] = w[layout.down_bias]
    return Experts(gate.contiguous(), up.contiguous(), down.contiguous(), **biases,
                   activation=activation)


def _to_fused(experts: Experts, layout: Fused) -> dict[str, torch.Tensor]:
    gate_up, down = _join(experts.gate, experts.up, layout.interleaved), experts.down
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    out = {layout.gate_up: gate_up, layout.down: down}
    if layout.gate_up_bias is not None:
        out[layout.gate_up_bias] = _join(experts.gate_bias, experts.up_bias, layout.interleaved)
    if layout.down_bias is not None:
        out[layout.down_bias] = experts.down_bias
    return out


def routed_outputs(x: torch.Tensor, experts: Experts, index: torch.Tensor,
                   sums: torch.Tensor | None = None):
    """For each expert e some token picked: (e, token, slot, output) with index[token, slot] = e
    and output = expert e on x[token]. x: [T, H]; index: [T, K].

    With sums ([E, F] fp32), also adds every expert's activations over ALL of x to it: the
    output statistics need them on every token, and the routed tokens' rows are then taken
    from them rather than projected a second time (issue 14)."""
    for e in range(len(experts)):
        token, slot = torch.where(index == e)
        if sums is not None:
            hidden = _summed_hidden(x, experts, e, token, sums)
            if token.numel():
                yield e, token, slot, experts.down_projection(hidden, e)
        elif token.numel():
            yield e, token, slot, experts.output(x[token], e)


def _summed_hidden(x: torch.Tensor, experts: Experts, e: int, token: torch.Tensor,
                   sums: torch.Tensor) -> torch.Tensor:
    """Expert e's activations [len(token), F] on x[token] (token ascending), in x's dtype,
    after adding its fp32 activations over every row of x to sums[e]. The products run in
    x's dtype, the activation and the sum in fp32, as in the statistics' own pass."""
    bounds = torch.searchsorted(token, torch.arange(0, x.shape[0] + SUM_CHUNK_TOKENS,
                                                    SUM_CHUNK_TOKENS, device=token.device))
    picked = []
    for chunk, start in enumerate(range(0, x.shape[0], SUM_CHUNK_TOKENS)):
        gate, up = experts.projections(x[start:start + SUM_CHUNK_TOKENS], e)
        activations = experts.activation(gate.float(), up.float())
        sums[e] += activations.sum(0)
        rows = token[bounds[chunk]:bounds[chunk + 1]] - start
        picked.append(activations[rows].to(x.dtype))
    return torch.cat(picked)


@dataclass
class RoutingRecord:
    """What a MoE block's router chose over every call: the block's inputs and each token's
    top-k experts and weights, in call order; with saliency, REAP's running sums (the routed
    weight times the norm of the expert's output, per expert) from the same forward.
    tokens: how many tokens the calls will bring in all (the inputs are written in place)."""

    tokens: int
    saliency: bool = False
    keep_output: bool = False  # keep the routed-expert output too (the layer fit's target)
    # Sum every expert's activations over all tokens in the forward (the output statistics).
    activation_sums: bool = False
    inputs: torch.Tensor | None = None  # [T, H]
    outputs: torch.Tensor | None = None  # [T, H] fp32, with keep_output
    index: list[torch.Tensor] = field(default_factory=list)  # [t, K] per call
    weights: list[torch.Tensor] = field(default_factory=list)  # [t, K] fp32 per call
    filled: int = 0
    saliency_sum: torch.Tensor | None = None  # [E] fp64
    picked: torch.Tensor | None = None  # [E] fp64
    sums: torch.Tensor | None = None  # [E, F] fp32, with activation_sums

    def sums_for(self, experts: Experts) -> torch.Tensor | None:
        """The running activation sums the forward adds to (None without activation_sums)."""
        if self.activation_sums and self.sums is None:
            self.sums = torch.zeros(experts.gate.shape[:2], device=experts.gate.device)
        return self.sums

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
        sums = None if record is None else record.sums_for(self.stacked)
        for e, token, slot, y in routed_outputs(x, self.stacked, index, sums):
            weight = weights[token, slot, None]
            out.index_add_(0, token, (y * weight).to(x.dtype))
            if record is not None and record.saliency:
                record.observe_output(e, weight[:, 0], y, len(self.stacked))
        if record is not None:
            record.observe_sum(out)
        return out
