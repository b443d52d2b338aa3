"""A checkpoint's decoder for evaluation, one layer's weights at a time: each layer is read,
built in transformers' module and run, then dropped, so scoring a model needs no more memory
than converting it. StreamedModel advances fixed tokens through the layers (teacher-forced
scores); greedy.py feeds generated tokens through them with a KV cache.
N sequences, S tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..io.source import Checkpoint
from ..io.storage import Storage
from ..io.tensors import TORCH_DTYPES
from ..model.decoder import HiddenStream, compute_dtype
from ..model.experts import RoutedExperts
from ..model.spec import ModelSpec


class CheckpointLayers:
    """A checkpoint's decoder layers, each read and built on demand on the device."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, device: torch.device,
                 dtype: torch.dtype | None = None):
        """dtype: the compute dtype (default: the checkpoint's on a GPU, fp32 on the CPU even
        where conversions compute in bf16: the measuring instrument must not add bf16 noise
        of its own to the KL it measures, which is compared to 1e-4 nats)."""
        self.ckpt, self.spec, self.device = ckpt, spec, device
        self.storage = Storage.of(ckpt)
        if dtype is None:
            stored = TORCH_DTYPES[ckpt.tensors[spec.family.embedding].dtype]
            dtype = compute_dtype(device, stored) if device.type == "cuda" else torch.float32
        self.decoder = spec.decoder(dtype)
        # What the forward reads outside the layers (not an MTP layer's, not a vision tower).
        outside = self.storage.logical(spec.global_names(ckpt.tensors), ckpt.tensors)
        self.global_names = [stored for name in outside if self.decoder.reads_global(name)
                             for stored in self.storage.stored_names(name)]

    def module(self, layer: int, check: bool = True) -> nn.Module:
        """Layer `layer` built from its weights, read now (check: refuse NaN and Inf, as the
        first read of a weight must)."""
        prefix = self.spec.layer_prefix(layer)
        raw = self.dense(self.ckpt.layer_tensors(prefix, check), prefix)
        tensors, experts = self.decoder.layer_parts(layer, raw, self.device)
        return self.decoder.build_layer(layer, tensors,
                                        None if experts is None else RoutedExperts(experts))

    def load_head(self) -> None:
        """Embeddings, final norm and LM head, read again."""
        globals_ = self.ckpt.read(self.global_names)
        self.decoder.load_globals(self.dense(globals_, ""), self.device)

    def dense(self, stored: dict[str, torch.Tensor], prefix: str):
        """Stored tensors (keyed below prefix) with quantized weights dequantized."""
        return self.storage.dense(stored, prefix, self.device, self.decoder.dtype)


class StreamedModel:
    """A checkpoint's hidden states for fixed tokens [N, S], advanced one layer per call."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, tokens: torch.Tensor,
                 device: torch.device, dtype: torch.dtype | None = None):
        self.layers = CheckpointLayers(ckpt, spec, device, dtype)
        self.spec, self.device, self.tokens = spec, device, tokens
        self.layers.load_head()
        self.stream = HiddenStream(self.layers.decoder, tokens, device)
        self.layers.decoder.drop_globals()  # the head is read again after the last layer

    def advance(self, layer: int) -> None:
        self.stream.advance(layer, self.layers.module(layer))

    def load_head(self) -> None:
        self.layers.load_head()

    def log_probs(self, sequence: int) -> torch.Tensor:
        """[S, V] next-token log-probabilities of one sequence."""
        logits = self.layers.decoder.logits(self.tokens[sequence:sequence + 1].to(self.device),
                                            self.stream.hidden[sequence:sequence + 1])
        return F.log_softmax(logits[0], -1)


def stream_side_by_side(models: list[StreamedModel], progress_bar) -> None:
    """Every model through every layer, layer by layer (one layer of each resident at a
    time), then its head loaded for log_probs; progress_bar wraps the layer range."""
    for layer in progress_bar(range(models[0].spec.num_layers)):
        for model in models:
            model.advance(layer)
    for model in models:
        model.load_head()
