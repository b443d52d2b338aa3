"""Fidelity of a reduced model: perplexity of both models, KL(original ‖ reduced), how often
its next-token argmax agrees with the original's, and how long its greedy continuations match
the original's (greedy.py).

Both checkpoints stream through the same held-out tokens one decoder layer at a time, so the
check needs no more memory than a conversion. N sequences, S tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..io.source import Checkpoint
from ..io.storage import Storage
from ..io.tensors import TORCH_DTYPES
from ..model.decoder import HiddenStream, compute_dtype, pick_device
from ..model.experts import RoutedExperts
from ..model.spec import ModelSpec, open_source
from ..model.tokenizer import embedding_rows, model_tokenizer
from ..pipeline.calibration import text_tokens
from ..pipeline.plan import validate_tensors
from . import greedy


@dataclass(frozen=True)
class Fidelity:
    tokens: int
    perplexity_original: float
    perplexity_reduced: float
    kl: float  # mean over predicted positions, nats
    top1_agreement: float  # share of positions where both models' argmax agree
    greedy_match: float | None = None  # mean leading tokens of the original's greedy text


class StreamedModel:
    """A checkpoint's hidden states for fixed tokens, advanced one layer per call."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, tokens: torch.Tensor,
                 device: torch.device, dtype: torch.dtype | None = None):
        """dtype: the compute dtype (default: the checkpoint's on a GPU, fp32 on the CPU even
        where conversions compute in bf16: the measuring instrument must not add bf16 noise
        of its own to the KL it measures, which is compared to 1e-4 nats)."""
        self.ckpt, self.spec, self.device, self.tokens = ckpt, spec, device, tokens
        self.storage = Storage.of(ckpt)
        if dtype is None:
            stored = TORCH_DTYPES[ckpt.tensors[spec.family.embedding].dtype]
            dtype = compute_dtype(device, stored) if device.type == "cuda" else torch.float32
        self.decoder = spec.decoder(dtype)
        # What the forward reads outside the layers (not an MTP layer's, not a vision tower).
        outside = self.storage.logical(spec.global_names(ckpt.tensors), ckpt.tensors)
        self.global_names = [stored for name in outside if self.decoder.reads_global(name)
                             for stored in self.storage.stored_names(name)]
        self.load_head()
        self.stream = HiddenStream(self.decoder, tokens, device)
        self.decoder.drop_globals()  # the head is read again after the last layer

    def advance(self, layer: int) -> None:
        prefix = self.spec.layer_prefix(layer)
        raw = self.dense(self.ckpt.layer_tensors(prefix), prefix)
        tensors, experts = self.decoder.layer_parts(layer, raw, self.device)
        module = self.decoder.build_layer(layer, tensors,
                                          None if experts is None else RoutedExperts(experts))
        self.stream.advance(layer, module)

    def load_head(self, globals_: dict[str, torch.Tensor] | None = None) -> None:
        """Embeddings, final norm and LM head (read again unless given)."""
        if globals_ is None:
            globals_ = self.ckpt.read(self.global_names)
        self.decoder.load_globals(self.dense(globals_, ""), self.device)

    def dense(self, stored: dict[str, torch.Tensor], prefix: str):
        """Stored tensors (keyed below prefix) with quantized weights dequantized."""
        return self.storage.dense(stored, prefix, self.device, self.decoder.dtype)

    def log_probs(self, sequence: int) -> torch.Tensor:
        """[S, V] next-token log-probabilities of one sequence."""
        logits = self.decoder.logits(self.tokens[sequence:sequence + 1].to(self.device),
                                     self.stream.hidden[sequence:sequence + 1])
        return F.log_softmax(logits[0], -1)


def evaluate(original: str, reduced: str, text: Path, seq_len: int = 512, samples: int = 64,
             device: str = "auto", progress: bool = True) -> Fidelity:
    return evaluate_many(original, [reduced], text, seq_len, samples, device, progress)[0]


def evaluate_many(original: str, reduced: list[str], text: Path, seq_len: int = 512,
                  samples: int = 64, device: str = "auto",
                  progress: bool = True) -> list[Fidelity]:
    """Score several reductions of one original: the original streams through the layers
    once, beside all of them."""
    torch_device = pick_device(device)
    ckpt, spec = open_source(original)
    others = [open_source(src) for src in reduced]
    for other, other_spec in others:
        _check_compatible(ckpt, spec, other, other_spec)
    tokens = held_out_tokens(ckpt, text, samples, seq_len)
    reference = StreamedModel(ckpt, spec, tokens, torch_device)
    models = [StreamedModel(*other, tokens, torch_device) for other in others]
    for layer in tqdm(range(reference.spec.num_layers), desc="eval", unit="layer",
                      disable=not progress, file=sys.stderr):
        for model in (reference, *models):
            model.advance(layer)
    for model in (reference, *models):
        model.load_head()
    scores = _score(reference, models, tokens)
    del reference, models  # the greedy check streams its own, shorter sequences
    lengths = _greedy_match(original, reduced, tokens, torch_device, progress)
    return [dataclasses.replace(score, greedy_match=length)
            for score, length in zip(scores, lengths, strict=True)]


def held_out_tokens(ckpt: Checkpoint, text: Path, samples: int, seq_len: int) -> torch.Tensor:
    """[N, S] evaluation tokens of text (the same for every model scored against ckpt)."""
    tokens = text_tokens(text, model_tokenizer(ckpt), samples, seq_len, seed=0,
                         kind="held-out")
    if tokens.shape[1] < 2:
        raise UserError(f"{text} gives {tokens.shape[1]} token: nothing to predict")
    return tokens


def _greedy_match(original: str, reduced: list[str], tokens: torch.Tensor,
                  device: torch.device, progress: bool) -> list[float]:
    """Each reduction's mean matched greedy length on a few prompts cut from tokens."""
    def open_model(source: str, ids: torch.Tensor) -> StreamedModel:
        return StreamedModel(*open_source(source), ids, device)

    layers = open_source(original)[1].num_layers
    prompts = tokens[:greedy.PROMPTS, :greedy.PROMPT_TOKENS]
    continued = greedy.greedy_continuation(original, prompts, open_model, layers,
                                           progress=progress)
    return [greedy.matched_lengths(log_probs, continued, greedy.CONTINUATION_TOKENS)
            .float().mean().item()
            for log_probs in greedy.streamed_log_probs(reduced, continued, open_model, layers)]


def _check_compatible(a: Checkpoint, a_spec: ModelSpec, b: Checkpoint, b_spec: ModelSpec) -> None:
    """Before any weight is read: both models must hold every tensor the forward reads, and
    share depth, width and vocabulary (the same token ids go into both)."""
    for ckpt, spec in ((a, a_spec), (b, b_spec)):
        validate_tensors(ckpt, spec)
    if (a_spec.num_layers, a_spec.hidden) != (b_spec.num_layers, b_spec.hidden):
        raise UserError("the two models differ in depth or width: not an original and its "
                        "reduction")
    rows = [embedding_rows(ckpt) for ckpt in (a, b)]
    if rows[0] != rows[1]:
        raise UserError(f"the two models have different vocabularies ({rows[0]} and {rows[1]} "
                        "embedding rows): not an original and its reduction")


def _score(reference: StreamedModel, models: list[StreamedModel],
           tokens: torch.Tensor) -> list[Fidelity]:
    """Perplexity of every model, each reduction's mean KL(original ‖ reduced) and its
    top-1 agreement with the original."""
    nll = torch.zeros(1 + len(models), dtype=torch.float64)
    kl = torch.zeros(len(models), dtype=torch.float64)
    agree = torch.zeros(len(models), dtype=torch.float64)
    count = 0
    for i in range(tokens.shape[0]):
        target = tokens[i, 1:, None].to(reference.device)
        orig = reference.log_probs(i)[:-1]
        nll[0] += -orig.gather(1, target).sum().item()
        for k, model in enumerate(models):
            red = model.log_probs(i)[:-1]
            nll[k + 1] += -red.gather(1, target).sum().item()
            kl[k] += (orig.exp() * (orig - red)).sum().item()
            agree[k] += (orig.argmax(-1) == red.argmax(-1)).sum().item()
        count += target.numel()
    ppl = torch.exp(nll / count)
    return [Fidelity(count, ppl[0].item(), ppl[k + 1].item(), kl[k].item() / count,
                     agree[k].item() / count)
            for k in range(len(models))]
