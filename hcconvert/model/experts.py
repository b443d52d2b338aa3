"""Routed experts: the stacked weights of one MoE layer, and the module that runs them inside
transformers' MoE block while recording what the router chose.

A layer's experts may be kept where they do not compute (on the host, pinned, when the layer
does not fit the GPU budget, --max-gpu-memory): every consumer then brings them to the compute
device in chunks (Experts.chunks), so the GPU holds at most two chunks, the one in use and the
next, never the whole layer. On the CPU, or with the whole layer resident, a chunk is a view.

T tokens, H hidden, E experts, F expert ffn, K top-k.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .activation import SILU, Activation
from .layouts import ExpertLayout, Fused, Stacked

# Each per-expert tensor's neuron (ffn) axis, below the expert axis: permuting neurons moves
# these together and leaves an expert's output unchanged. down_bias has none.
NEURON_AXIS = {"gate": 0, "up": 0, "gate_bias": 0, "up_bias": 0, "down": 1, "down_bias": None}
# Rows per product when the routed forward also sums activations over all tokens: bounds the
# fp32 temporaries at 3 x SUM_CHUNK_TOKENS x F. Measured on the CPU (8192 rows, SwiGLU and
# sums included): at F = 2048, 1024 rows took 0.057 s in bf16 against 0.10-0.11 s for 4096
# (temporaries that stay in cache; 0.20 against 0.23 s in fp32); at Mixtral's H = 4096,
# F = 14336, 1024 and 4096 rows were equal within noise.
SUM_CHUNK_TOKENS = 1024
# Half-precision products on the CPU run through oneDNN, which JIT-compiles (about 8 ms) and
# caches (about 1 MB, up to 1024 of them) one primitive per matmul shape. Routed token counts
# would give hundreds of shapes per run: 0.5-2 GB of host memory and seconds of compiling
# (docs/BENCHMARKS.md, "bf16 products"). Padding an expert's rows up to one of this many
# sizes per octave bounds the shapes (about 60 up to 1024 rows) at <= 12.5 % extra rows.
ROW_SIZES_PER_OCTAVE = 8
# oneDNN's linear with a fused post-op, the op Inductor's CPU backend compiles to: SiLU
# applied to the gate product's fp32 accumulators, then the up product multiplied by it, with
# no [t, F] fp32 temporaries in between. Half precision on the CPU only (missing from builds
# without oneDNN: None; see also _fused_products_available).
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


@dataclass
class Experts:
    """One MoE block's routed experts, stacked. gate, up: [E, F, H]; down: [E, H, F]; the
    optional biases (GPT-OSS) gate_bias, up_bias [E, F] and down_bias [E, H]. Ungated experts
    (Nemotron-H's: down(act(up x))) have no gate."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: Activation = SILU
    # Where the experts compute (None: where the tensors are) and how many at most are brought
    # there at once (None: all); set by kept_on.
    compute_device: torch.device | None = None
    chunk_experts: int | None = None

    @classmethod
    def from_layer(cls, w: dict, layout: ExpertLayout, count: int, device=None,
                   dtype: torch.dtype | None = None, activation: Activation = SILU,
                   pin: bool = False) -> Experts:
        """Read the experts whichever way the checkpoint stores them, onto device and dtype
        (default: where and as w holds them); pin: into pinned host memory."""
        if isinstance(layout, Fused | Stacked):
            whole = (_from_fused(w, layout, activation) if isinstance(layout, Fused) else
                     cls(w[layout.gate], w[layout.up], w[layout.down], activation=activation))
            whole = whole.to(device, dtype)
            return whole.pinned() if pin else whole

        def stack(template: str) -> torch.Tensor:
            # Straight into the destination, expert by expert: no host-side stacked copy, and
            # pinned sources copy to the GPU asynchronously.
            first = w[template.format(expert=0)]
            out = torch.empty((count, *first.shape), dtype=dtype or first.dtype,
                              device=device or first.device, pin_memory=pin)
            # Into the host, the copy must be complete before the host reads it.
            non_blocking = out.device.type != "cpu"
            for e in range(count):
                out[e].copy_(w[template.format(expert=e)], non_blocking=non_blocking)
            return out

        names = layout.names
        gate = stack(names.gate) if names.gate is not None else None
        return cls(gate, stack(names.up), stack(names.down), activation=activation)

    @classmethod
    def stacked(cls, members: list[dict[str, torch.Tensor]], activation: Activation) -> Experts:
        """Experts from one parts() dict per expert."""
        stacked = {name: torch.stack([m[name] for m in members]) for name in members[0]}
        return cls(**{"gate": None, **stacked}, activation=activation)  # ungated: no gate

    def parts(self) -> dict[str, torch.Tensor]:
        """The stacked tensors present, by field name (gate, up, down, then any biases)."""
        return {name: getattr(self, name) for name in NEURON_AXIS
                if getattr(self, name) is not None}

    def to_layer(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """The tensors to store, in the layout read (per-expert names renumbered 0..E-1)."""
        if isinstance(layout, Fused):
            return _to_fused(self, layout)
        if isinstance(layout, Stacked):
            return {layout.gate: self.gate, layout.up: self.up, layout.down: self.down}
        out = {}
        for e in range(len(self)):
            for template, stacked in layout.names.stacked(self):
                out[template.format(expert=e)] = stacked[e]
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> Experts:
        return dataclasses.replace(self, **{name: t.to(device=device, dtype=dtype)
                                            for name, t in self.parts().items()})

    def pinned(self) -> Experts:
        return dataclasses.replace(self, **{name: t.pin_memory()
                                            for name, t in self.parts().items()})

    def kept_on(self, device: torch.device, chunk_experts: int | None) -> Experts:
        """These experts computing on device, at most chunk_experts of them there at once."""
        return dataclasses.replace(self, compute_device=device, chunk_experts=chunk_experts)

    @property
    def device(self) -> torch.device:
        """Where the experts compute."""
        return self.compute_device or self.up.device

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert as held."""
        return sum(t[0].numel() * t.element_size() for t in self.parts().values())

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's tensors by field name, where they are held."""
        return {name: stacked[e] for name, stacked in self.parts().items()}

    def select(self, indices: Sequence[int]) -> tuple[Experts, list[int]]:
        """The experts `indices` on the compute device (one chunk: at most chunk_experts of
        them), and where each of them is in it. Experts kept there without a chunk size are not
        copied; with one (a budget) they are, the CPU included, so a chunk costs the same
        wherever it runs."""
        indices = list(indices)
        if self.chunk_experts is None and self.up.device == self.device:
            return dataclasses.replace(self, compute_device=None, chunk_experts=None), indices
        chunk = dataclasses.replace(
            self, compute_device=None, chunk_experts=None,
            **{name: _gather(t, indices, self.device) for name, t in self.parts().items()})
        return chunk, list(range(len(indices)))

    def chunks(self, indices: Sequence[int] | None = None) -> ExpertChunks:
        """The experts `indices` (default: all), in order, brought to the compute device a
        chunk at a time."""
        return ExpertChunks(self, list(range(len(self)) if indices is None else indices))

    def members(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(e, expert e's tensors on the compute device) for each of indices, in order."""
        for chunk, places in self.chunks(indices):
            for e, at in places:
                yield e, chunk.expert(at)

    def projections(self, x: torch.Tensor,
                    e: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """[t, F] expert e's gate (None: ungated) and up projections of x [t, H], computed in
        x's dtype."""
        gate = None if self.gate is None else F.linear(x, self.gate[e].to(x.dtype),
                                                       _row(self.gate_bias, e, x.dtype))
        up = F.linear(x, self.up[e].to(x.dtype), _row(self.up_bias, e, x.dtype))
        return gate, up

    def hidden(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """[t, F] expert e's ffn activations on x [t, H], computed in x's dtype."""
        fused = self.fused_hidden(x, e)
        return fused if fused is not None else self.activation(*self.projections(x, e))

    def fused_hidden(self, x: torch.Tensor, e: int) -> torch.Tensor | None:
        """hidden(x, e) through oneDNN's fused products (_LINEAR_POINTWISE) where they apply:
        half precision on the CPU, SiLU experts without gate or up biases; else None. The
        activation is formed from the fp32 accumulators, closer to fp32 than rounding the
        products first (2.4e-3 against 2.6e-3 relative error), and the summing forward takes
        9 % less time (docs/DESIGN.md, "Every FLOP once")."""
        if (x.device.type != "cpu" or x.dtype == torch.float32 or self.activation != SILU
                or self.gate is None
                or self.gate_bias is not None or self.up_bias is not None
                or not _fused_products_available(x.dtype)):
            return None
        return _fused_swiglu(x, self.gate[e].to(x.dtype), self.up[e].to(x.dtype))

    def down_projection(self, hidden: torch.Tensor, e: int) -> torch.Tensor:
        """[t, H] expert e's output from its ffn activations [t, F], in their dtype."""
        return F.linear(hidden, self.down[e].to(hidden.dtype),
                        _row(self.down_bias, e, hidden.dtype))

    def output(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """[t, H] expert e's output on x [t, H], computed in x's dtype."""
        return self.down_projection(self.hidden(x, e), e)

    def __len__(self) -> int:
        return self.up.shape[0]


class ExpertChunks:
    """Some experts of a layer on the compute device a chunk at a time, iterated as (the
    chunk's Experts, (e, e's place in the chunk) for each of its experts); iterable again. A
    single chunk is brought over once and kept, so a group that fits is not copied again for
    every pass over the tokens."""

    def __init__(self, experts: Experts, indices: list[int]):
        size = experts.chunk_experts or max(1, len(indices))
        self.experts = experts
        self.parts = [indices[start:start + size] for start in range(0, len(indices), size)]
        self.kept = [self._bring(self.parts[0])] if len(self.parts) == 1 else None

    def _bring(self, part: list[int]) -> tuple[Experts, list[tuple[int, int]]]:
        chunk, places = self.experts.select(part)
        return chunk, list(zip(part, places, strict=True))

    def __iter__(self) -> Iterator[tuple[Experts, list[tuple[int, int]]]]:
        if self.kept is not None:
            yield from self.kept
            return
        for part in self.parts:
            yield self._bring(part)


def _fused_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(x · gateᵀ) · (x · upᵀ) in two oneDNN products with post-ops."""
    silu_gate = _LINEAR_POINTWISE(x, gate, None, "swish", [], "")
    return _LINEAR_POINTWISE.binary(x, silu_gate, up, None, "mul")


@functools.cache
def _fused_products_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused products run in dtype on this CPU, where plain half-precision
    products always do. oneDNN has no such primitive for bf16 below AVX-512, nor for fp16
    below AVX512-FP16 (RuntimeError; seen with ONEDNN_MAX_CPU_ISA capping the ISA)."""
    if _LINEAR_POINTWISE is None:
        return False
    weight = torch.ones(16, 16, dtype=dtype)
    try:
        _fused_swiglu(torch.ones(1, 16, dtype=dtype), weight, weight)
    except RuntimeError:
        return False
    return True


def _gather(stacked: torch.Tensor, indices: list[int], device: torch.device) -> torch.Tensor:
    """stacked[indices] on device, copied expert by expert: views of pinned host memory copy
    to the GPU asynchronously, a gathered host copy would not be pinned."""
    out = torch.empty((len(indices), *stacked.shape[1:]), dtype=stacked.dtype, device=device)
    for position, e in enumerate(indices):
        out[position].copy_(stacked[e], non_blocking=True)
    return out


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
    """For each expert e some token picked, in expert order: (e, token, slot, output) with
    index[token, slot] = e and output = expert e on x[token]. x: [T, H]; index: [T, K].
    Only the picked experts are brought to the compute device.

    With sums ([E, F] fp32), also adds every expert's activations over ALL of x to it (every
    expert is then brought over): the output statistics need them on every token, and the
    routed tokens' rows are then taken from them rather than projected a second time."""
    wanted = range(len(experts)) if sums is not None else index.unique().tolist()
    for chunk, places in experts.chunks(list(wanted)):
        for e, at in places:
            token, slot = torch.where(index == e)
            if sums is not None:
                hidden = _summed_hidden(x, chunk, at, token, sums[e])
                if token.numel():
                    y = chunk.down_projection(_shape_stable(hidden), at)
                    yield e, token, slot, y[:len(token)]
            elif token.numel():
                yield e, token, slot, chunk.output(_shape_stable(x[token]), at)[:len(token)]


def padded_rows(rows: int) -> int:
    """rows rounded up to one of ROW_SIZES_PER_OCTAVE sizes per octave (exact below twice it)."""
    step = 1 << max(rows.bit_length() - ROW_SIZES_PER_OCTAVE.bit_length(), 0)
    return -(-rows // step) * step


def _shape_stable(rows: torch.Tensor) -> torch.Tensor:
    """rows [t, ·] with zero rows appended up to padded_rows(t) where the products go through
    oneDNN (half precision on the CPU, see ROW_SIZES_PER_OCTAVE); elsewhere rows itself, since
    padding would only add work."""
    if rows.device.type != "cpu" or rows.dtype == torch.float32:
        return rows
    extra = padded_rows(len(rows)) - len(rows)
    return torch.cat([rows, rows.new_zeros(extra, rows.shape[1])]) if extra else rows


def _summed_hidden(x: torch.Tensor, experts: Experts, e: int, token: torch.Tensor,
                   sums: torch.Tensor) -> torch.Tensor:
    """Expert e's activations [len(token), F] on x[token] (token ascending), in x's dtype,
    after adding its activations over every row of x to sums ([F] fp32, its running sums).
    The products run in x's dtype, the sum in fp32, as in the statistics' own pass; the
    activation in fp32 too, unless the fused products form it (Experts.fused_hidden)."""
    bounds = torch.searchsorted(token, torch.arange(0, x.shape[0] + SUM_CHUNK_TOKENS,
                                                    SUM_CHUNK_TOKENS, device=token.device))
    picked = []
    for chunk, start in enumerate(range(0, x.shape[0], SUM_CHUNK_TOKENS)):
        rows = token[bounds[chunk]:bounds[chunk + 1]] - start
        part = x[start:start + SUM_CHUNK_TOKENS]
        activations = experts.fused_hidden(part, e)  # in x's dtype
        if activations is None:
            activations = experts.activation.in_fp32(*experts.projections(part, e))
        sums += activations.sum(0, dtype=torch.float32)
        picked.append(activations.index_select(0, rows).to(x.dtype))
    return torch.cat(picked)


@dataclass
class RoutingRecord:
    """What a MoE block's router chose over every call: the block's inputs and each token's
    top-k experts, in call order; with saliency, REAP's running sums (the routed
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
    filled: int = 0
    saliency_sum: torch.Tensor | None = None  # [E] fp64
    picked: torch.Tensor | None = None  # [E] fp64
    sums: torch.Tensor | None = None  # [E, F] fp32, with activation_sums
    # What the router read, per call, where it is not the experts' input (Gemma 4's router
    # reads the residual, its experts a normed copy): [t, H] each, in call order.
    router_reads: list[torch.Tensor] = field(default_factory=list)

    def sums_for(self, experts: Experts) -> torch.Tensor | None:
        """The running activation sums the forward adds to (None without activation_sums)."""
        if self.activation_sums and self.sums is None:
            self.sums = torch.zeros(experts.up.shape[:2], device=experts.device)
        return self.sums

    def observe(self, x: torch.Tensor, index: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = x.new_empty((self.tokens, x.shape[1]))
        self.inputs[self.filled:self.filled + x.shape[0]] = x
        self.filled += x.shape[0]
        self.index.append(index)

    def observe_router(self, x: torch.Tensor) -> None:
        self.router_reads.append(x.reshape(-1, x.shape[-1]))

    def router_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """[T, H] what the router read for each token: the recorded reads, else inputs (the
        experts' inputs, which most routers read)."""
        return torch.cat(self.router_reads) if self.router_reads else inputs

    def observe_sum(self, out: torch.Tensor) -> None:
        """The routed-expert output of the tokens observe saw last."""
        if not self.keep_output:
            return
        if self.outputs is None:
            self.outputs = out.new_empty((self.tokens, out.shape[1]), dtype=torch.float32)
        self.outputs[self.filled - out.shape[0]:self.filled] = out

    def routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs [T, H] and top-k index [T, K] of every token."""
        if self.filled != self.tokens:
            raise RuntimeError(f"the layer saw {self.filled} of {self.tokens} tokens")
        return self.inputs, torch.cat(self.index)

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
            record.observe(x, index)
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


class PrescaledExperts(nn.Module):
    """Adapts Llama-4's calling convention to experts(x, index, weights) (`inner`: RoutedExperts
    or decoder's routing catcher).

    Llama-4's MoE block calls experts(routed_in): routed_in [E*T, H] is every token repeated
    once per expert and scaled by that expert's router score (the sigmoid of its logit for
    the top-1 expert, 0 for the others), and the block sums the E outputs. The score scales
    the expert's input, not its output. With top-1 routing (spec.py refuses more) each token
    reaches one expert e, with u = score · x; this hands inner x = u, index = e, weights = 1.
    So the routing record holds the inputs the experts actually see, the output Σ 1 · expert(u)
    is the block's own, and REAP's saliency (weight × output norm) is the norm of the expert's
    contribution. The statistics' "mean output over all tokens" is then every expert's output
    on every token's routed input u (the token scaled by the score of the expert it picked):
    the inputs this layer's experts see. The layer fit and HC-SMoE's features hold each token's
    input at the original router's score, though a reduced router scores anew (the forward
    of a reduced layer, --propagate merged included, uses its own scores)."""

    def __init__(self, inner: nn.Module, router: nn.Module):
        super().__init__()
        self.inner = inner
        self.picked: torch.Tensor | None = None  # [T, 1]: each token's expert, from the router
        router.register_forward_hook(self._catch_choice)

    def _catch_choice(self, router: nn.Module, args, output) -> None:
        _, logits = output
        self.picked = logits.topk(1, dim=-1).indices  # the router's own top-1 choice

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        tokens = self.picked.shape[0]
        per_expert = routed_in.view(-1, tokens, routed_in.shape[-1])  # [E, T, H]
        seen = per_expert[self.picked[:, 0], torch.arange(tokens, device=routed_in.device)]
        out = self.inner(seen, self.picked, torch.ones(self.picked.shape,
                                                       device=routed_in.device))
        # The block sums E slices of T rows: the routed output in the first, zeros after.
        return torch.cat((out, out.new_zeros((per_expert.shape[0] - 1) * tokens, out.shape[1])))
