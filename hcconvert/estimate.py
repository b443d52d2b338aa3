"""Memory a conversion will need, estimated from config.json, the headers and the options
before any weight is read (--dry-run prints it; docs/BENCHMARKS.md checks it against measured
peaks).

A MoE layer's peak holds, on the compute device: the calibration hidden states and the MoE
inputs the router record keeps ([T, H] each, in the compute dtype), the original layer's
routed output when a layer fit needs it ([T, H] fp32), a copy of the layer's input with
--propagate merged, the layer's weights with its routed experts stacked in the compute dtype,
and one reducer's merged experts. On the host: the layer being read and the
one being written besides the one computed (streaming.py), the embedding table and LM head
while they are read, and the process itself. T tokens, H hidden, S sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import compute_dtype
from .options import ConvertOptions
from .source import Checkpoint
from .spec import ModelSpec

# Python, torch, transformers and the family's modules, resident before any tensor: measured
# on the bench machine (VmRSS after the imports and an empty skeleton).
PROCESS_BYTES = 700 * 10**6


@dataclass(frozen=True)
class MemoryEstimate:
    device: int  # bytes on the GPU; 0 for a CPU run
    host: int


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(ckpt: Checkpoint, spec: ModelSpec, options: ConvertOptions,
                    layer_bytes: int, gpu: bool, mtp: bool = False) -> MemoryEstimate:
    """Peak GPU and host bytes of a conversion of ckpt with these options; layer_bytes: the
    largest layer as stored; mtp: the checkpoint stores an MTP layer, whose next-token
    embeddings stay resident from the start (mtp.NextTokenInputs)."""
    embedding = next(info for name, info in ckpt.tensors.items()
                     if name.endswith("embed_tokens.weight"))
    stored = torch.bfloat16 if embedding.dtype in ("BF16", "F16") else torch.float32
    dtype = compute_dtype(torch.device("cuda" if gpu else "cpu"), stored, options.compute_dtype)
    scale = element_bytes(dtype) / element_bytes(stored)  # compute bytes per stored byte
    globals_bytes = _globals_bytes(ckpt)
    tokens = _token_bytes(spec, options, dtype, mtp)
    start = int(globals_bytes * scale) + tokens
    compute = max(start, tokens + _layer_weights(spec, options, layer_bytes, dtype, scale))
    streamed = PROCESS_BYTES + 2 * layer_bytes + globals_bytes
    if gpu:
        return MemoryEstimate(compute, streamed)
    return MemoryEstimate(0, streamed + compute)


def _globals_bytes(ckpt: Checkpoint) -> int:
    """Embeddings and LM head, read once at the start (copied into the output as stored)."""
    return sum(info.nbytes for name, info in ckpt.tensors.items()
               if name.endswith(("embed_tokens.weight", "lm_head.weight")))


def _token_bytes(spec: ModelSpec, options: ConvertOptions, dtype: torch.dtype,
                 mtp: bool) -> int:
    """The hidden states, the MoE inputs the router record keeps, the layer's input with
    --propagate merged, the MTP layer's next-token embeddings, and the fit's target (the
    original routed output, fp32)."""
    tokens = options.calib_samples * options.seq_len
    copies = 2 + (options.propagate == "merged") + mtp
    total = copies * tokens * spec.hidden * element_bytes(dtype)
    if options.layer_fit or options.method == "auto":
        total += tokens * spec.hidden * 4
    return total


def _layer_weights(spec: ModelSpec, options: ConvertOptions, layer_bytes: int,
                   dtype: torch.dtype, scale: float) -> int:
    """A MoE layer's weights in the compute dtype with the merged experts of one reducer.
    (Attention's scores are not counted: torch's fused attention kernels, on the CPU too,
    keep no [heads, S, S] matrix of a causal batch.)"""
    expert = 3 * spec.ffn * spec.hidden * element_bytes(dtype)
    return int(layer_bytes * scale) + options.experts * expert
