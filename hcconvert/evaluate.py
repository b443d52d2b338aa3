"""Fidelity of a reduced model: perplexity of both models and KL(original ‖ reduced).

Both checkpoints stream through the same held-out tokens one decoder layer at a time, so the
check needs no more memory than a conversion. N sequences, S tokens, V vocabulary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import TextTokenizer, calibration_tokens, read_documents
from .convert import open_source, pick_device
from .errors import UserError
from .modeling import decoder_layer, final_logits, start_stream
from .source import Checkpoint
from .spec import ModelSpec


@dataclass(frozen=True)
class Fidelity:
    tokens: int
    perplexity_original: float
    perplexity_reduced: float
    kl: float  # mean over predicted positions, nats


class StreamedModel:
    """A checkpoint's hidden states for fixed tokens, advanced one layer per call."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, tokens: torch.Tensor,
                 device: torch.device):
        self.ckpt, self.spec, self.device = ckpt, spec, device
        self.table = self.ckpt.get("model.embed_tokens.weight")
        self.hidden, self.rope, self.dtype = start_stream(self.spec, self.table, tokens, device)
        if not self.spec.tie_embeddings:
            self.table = None  # only a tied LM head needs it again

    def advance(self, layer: int) -> None:
        w = {k: v.to(self.device, self.dtype) for k, v in self.ckpt.layer_tensors(layer).items()}
        self.hidden = decoder_layer(self.spec, layer, w, self.hidden, self.rope)

    def load_head(self) -> None:
        """Final norm and LM head, read once after the last layer."""
        head = self.table if self.table is not None else self.ckpt.get("lm_head.weight")
        self.norm = self.ckpt.get("model.norm.weight").to(self.device, self.dtype)
        self.lm_head = head.to(self.device, self.dtype)

    def log_probs(self, sequence: int) -> torch.Tensor:
        """[S, V] next-token log-probabilities of one sequence."""
        logits = final_logits(self.spec, self.norm, self.lm_head, self.hidden[sequence])
        return F.log_softmax(logits, -1)


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
    tokens = calibration_tokens(read_documents(text, "held-out"), TextTokenizer(ckpt.root),
                                samples, seq_len, seed=0, kind="held-out")
    reference = StreamedModel(ckpt, spec, tokens, torch_device)
    models = [StreamedModel(*open_source(src), tokens, torch_device) for src in reduced]
    for model in models:
        _check_compatible(reference.spec, model.spec)
    for layer in tqdm(range(reference.spec.num_layers), desc="eval", disable=not progress,
                      file=sys.stderr):
        for model in (reference, *models):
            model.advance(layer)
    for model in (reference, *models):
        model.load_head()
    return _score(reference, models, tokens)


def _check_compatible(a: ModelSpec, b: ModelSpec) -> None:
    if (a.num_layers, a.hidden) != (b.num_layers, b.hidden):
        raise UserError("the two models differ in depth or width: not an original and its "
                        "reduction")


def _score(reference: StreamedModel, models: list[StreamedModel],
           tokens: torch.Tensor) -> list[Fidelity]:
    """Perplexity of every model and each reduction's mean KL(original ‖ reduced)."""
    nll = torch.zeros(1 + len(models), dtype=torch.float64)
    kl = torch.zeros(len(models), dtype=torch.float64)
    count = 0
    for i in range(tokens.shape[0]):
        target = tokens[i, 1:, None].to(reference.device)
        orig = reference.log_probs(i)[:-1]
        nll[0] += -orig.gather(1, target).sum().item()
        for k, model in enumerate(models):
            red = model.log_probs(i)[:-1]
            nll[k + 1] += -red.gather(1, target).sum().item()
            kl[k] += (orig.exp() * (orig - red)).sum().item()
        count += target.numel()
    ppl = torch.exp(nll / count)
    return [Fidelity(count, ppl[0].item(), ppl[k + 1].item(), kl[k].item() / count)
            for k in range(len(models))]
