"""Memory a conversion will need, estimated from config.json, the headers and the options
before any weight is read (--dry-run prints it; docs/BENCHMARKS.md checks it against measured
peaks), and how a MoE layer's experts are split to fit the GPU budget (--max-gpu-memory).

A MoE layer's peak holds, on the compute device: the calibration hidden states and the MoE
inputs the router record keeps ([T, H] each, in the compute dtype), the original layer's
routed output and the fit's prediction when a layer fit needs them ([T, H] fp32 each), a copy
of the layer's input with --propagate merged, the layer's weights other than its routed
experts, the work buffers of one expert's merge or fit, and the routed experts: all of them
and one reducer's merged experts when they fit the budget, otherwise two chunks of experts
at a time (the one in use and the next), the rest kept on the host (pinned). On the host: the
layer being read and the one being written besides the one computed (streaming.py), the
embedding table and LM head while they are read, the process itself, and a layer's experts in
the compute dtype with the merged ones when they are kept there.
T tokens, H hidden, F expert ffn, S sequence length, E experts, R experts kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..io.source import Checkpoint
from ..methods.alignment import ALIGN_CHUNK_TOKENS
from ..methods.layerfit import CHUNK_TOKENS, fit_bytes, fit_state_bytes
from ..methods.merging import ACTIVATION_RULES
from ..methods.ream_alignment import PCA_COMPONENTS, SAMPLE_TOKENS
from ..model.decoder import compute_dtype
from ..model.spec import ModelSpec
from ..resources import human_bytes
from .options import ConvertOptions

# Python, torch, transformers and the family's modules, resident before any tensor: measured
# on the bench machine (VmRSS after the imports and an empty skeleton).
PROCESS_BYTES = 700 * 10**6
# What the automatic budget leaves free on the GPU: the CUDA context, the caching allocator's
# fragmentation and the small temporaries no term counts.
AUTO_MARGIN_FRACTION = 0.1
AUTO_MARGIN_MIN = 2 * 10**9


@dataclass(frozen=True)
class LayerBudget:
    """How one MoE layer uses the GPU: bytes besides the routed experts (fixed), one expert's
    bytes, and experts per chunk (None: the layer's and the merged experts all resident)."""

    fixed: int
    expert: int
    chunk_experts: int | None
    experts: int
    kept: int

    @property
    def device(self) -> int:
        """The layer's GPU peak."""
        if self.chunk_experts is None:
            return self.fixed + (self.experts + self.kept) * self.expert
        return self.fixed + 2 * min(self.chunk_experts, self.experts) * self.expert

    @property
    def host_experts(self) -> int:
        """The experts kept on the host: the layer's and the merged ones."""
        return 0 if self.chunk_experts is None else (self.experts + self.kept) * self.expert


@dataclass(frozen=True)
class MemoryEstimate:
    device: int  # bytes on the GPU; 0 for a CPU run
    host: int
    chunk_experts: int | None = None  # experts per chunk on the GPU; None: the whole layer


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gpu_budget(option: int | None, device: torch.device) -> int | None:
    """The GPU bytes a conversion may use: --max-gpu-memory, or on CUDA the free memory less a
    margin; None (no limit) on the CPU."""
    if option is not None:
        return option
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(AUTO_MARGIN_MIN, int(total * AUTO_MARGIN_FRACTION)))


def expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """One routed expert's gate, up and down in the compute dtype."""
    return 3 * spec.ffn * spec.hidden * element_bytes(dtype)


def moe_layer_values(spec: ModelSpec) -> int:
    """Values in the largest MoE layer's tensors other than its routed experts (attention,
    norms, router, shared experts), from the skeleton on the meta device."""
    decoder = spec.decoder()
    return max(sum(torch.Size(shape).numel() for shape, _ in
                   decoder.expected_tensors(layer).values()) for layer in spec.moe_layers)


def layer_budget(spec: ModelSpec, options: ConvertOptions, dtype: torch.dtype,
                 other_values: int, mtp: bool, budget: int | None,
                 gpu: bool = False) -> LayerBudget:
    """How a MoE layer whose other tensors hold other_values values fits budget bytes (None:
    no limit) on a GPU or on the CPU; a budget that cannot hold the token buffers, the
    layer's other weights and two experts is a UserError."""
    fixed = (_token_bytes(spec, options, dtype, mtp, gpu) + other_values * element_bytes(dtype)
             + _work_bytes(spec, options) + _ream_bytes(spec, options))
    expert = expert_bytes(spec, dtype)
    # With several candidates (auto) the best so far is held beside the one being made.
    kept = options.experts * min(2, len(options.reductions()))
    whole = LayerBudget(fixed, expert, None, spec.num_experts, kept)
    if budget is None or whole.device <= budget:
        return whole
    chunk = (budget - fixed) // (2 * expert)
    if chunk < 1:
        raise UserError(
            f"--max-gpu-memory {human_bytes(budget)} is too small: a MoE layer needs "
            f"{human_bytes(fixed)} on the GPU for its token buffers and other weights, plus "
            f"{human_bytes(2 * expert)} for two experts; give at least "
            f"{human_bytes(fixed + 2 * expert)}, or use fewer calibration tokens")
    return LayerBudget(fixed, expert, chunk, spec.num_experts, kept)


def estimate_memory(ckpt: Checkpoint, spec: ModelSpec, options: ConvertOptions,
                    layer_bytes: int, gpu: bool, mtp: bool = False,
                    budget: int | None = None) -> MemoryEstimate:
    """Peak GPU and host bytes of a conversion of ckpt with these options under a GPU budget
    (None: none); layer_bytes: the largest layer as stored; mtp: the checkpoint stores an MTP
    layer, whose next-token embeddings stay resident from the start (mtp.NextTokenInputs)."""
    family = spec.family
    embedding = ckpt.tensors[family.embedding]
    stored = torch.bfloat16 if embedding.dtype in ("BF16", "F16") else torch.float32
    globals_bytes = sum(ckpt.tensors[name].nbytes for name in (family.embedding, family.lm_head)
                        if name in ckpt.tensors)
    return estimate_from_shapes(spec, options, stored, globals_bytes, layer_bytes,
                                moe_layer_values(spec), gpu, mtp, budget)


def estimate_from_shapes(spec: ModelSpec, options: ConvertOptions, stored: torch.dtype,
                         globals_bytes: int, layer_bytes: int, other_values: int, gpu: bool,
                         mtp: bool = False, budget: int | None = None) -> MemoryEstimate:
    """estimate_memory from the sizes alone: stored, the embedding's dtype as stored;
    globals_bytes, the embeddings and LM head as stored (read once at the start);
    other_values, the largest MoE layer's values besides its routed experts."""
    dtype = compute_dtype(torch.device("cuda" if gpu else "cpu"), stored, options.compute_dtype)
    scale = element_bytes(dtype) / element_bytes(stored)  # compute bytes per stored byte
    start = int(globals_bytes * scale) + _token_bytes(spec, options, dtype, mtp, gpu)
    streamed = PROCESS_BYTES + 2 * layer_bytes + globals_bytes
    if not gpu:  # the budget is the GPU's: on the CPU the whole layer is computed at once
        layer = layer_budget(spec, options, dtype, other_values, mtp, None)
        return MemoryEstimate(0, streamed + max(start, layer.device))
    layer = layer_budget(spec, options, dtype, other_values, mtp, budget, gpu=True)
    if budget is not None and start > budget:
        raise UserError(f"--max-gpu-memory {human_bytes(budget)} is too small: the embedding "
                        f"table and the calibration tokens need {human_bytes(start)} on the GPU")
    tokens = options.calib_samples * options.seq_len
    parked = fit_state_bytes(tokens, spec.top_k, options.experts, spec.ffn,
                             spec.hidden) if options.fits_layers else 0
    return MemoryEstimate(max(start, layer.device), streamed + layer.host_experts + parked,
                          layer.chunk_experts)


def _token_bytes(spec: ModelSpec, options: ConvertOptions, dtype: torch.dtype,
                 mtp: bool, gpu: bool) -> int:
    """The hidden states, the MoE inputs the router record keeps, the layer's input with
    --propagate merged, the MTP layer's next-token embeddings, and with a layer fit its
    target (the original routed output) and its prediction, fp32, and what it keeps between
    its rounds (on a GPU, without the state it parks on the host)."""
    tokens = options.calib_samples * options.seq_len
    copies = 2 + options.propagates_merged + mtp
    total = copies * tokens * spec.hidden * element_bytes(dtype)
    if options.fits_layers:
        total += 2 * tokens * spec.hidden * 4 + fit_bytes(tokens, spec.top_k, options.experts,
                                                          spec.ffn, spec.hidden,
                                                          element_bytes(dtype), parked=gpu)
    return total


def _ream_bytes(spec: ModelSpec, options: ConvertOptions) -> int:
    """REAM's merge: every neuron's weight features and the PCA's [E·F, q] work matrices
    (fp32, about four at once), and each expert's sampled token indices."""
    if not any(r.merge == "ream" for r in options.reductions().values()):
        return 0
    neurons = spec.num_experts * spec.ffn
    return 4 * neurons * PCA_COMPONENTS * 4 + spec.num_experts * SAMPLE_TOKENS * 8


def _work_bytes(spec: ModelSpec, options: ConvertOptions) -> int:
    """A token chunk's fp32 activations and outputs (the forward's, a merge's or a fit's),
    and, where a reduction merges, one expert's fp32 accumulators, with the [F, F] and
    [F, H] fp64 correlations of the merges that match neurons by their activations."""
    ffn, hidden = spec.ffn, spec.hidden
    activations = 3 * max(CHUNK_TOKENS, ALIGN_CHUNK_TOKENS) * max(ffn, hidden) * 4
    merges = [r.merge for r in options.reductions().values() if r.merges]
    accumulators = 3 * ffn * hidden * 4 if merges else 0
    matched = any(merge in ACTIVATION_RULES for merge in merges)
    equations = 2 * ffn * ffn * 8 + ffn * hidden * 8 if matched else 0
    return activations + accumulators + equations
