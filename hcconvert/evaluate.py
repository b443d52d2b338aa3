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
from .convert import compute_dtype, open_source, pick_device
from .errors import UserError
from .modeling import decoder_layer, embed, final_logits, rope_tables
from .spec import ModelSpec


@dataclass(frozen=True)
class Fidelity:
    tokens: int
    perplexity_original: float
    perplexity_reduced: float
    kl: float  # mean over predicted positions, nats


class StreamedModel:
    """A checkpoint's hidden states for fixed tokens, advanced one layer per call."""

    def __init__(self, src: str, tokens: torch.Tensor, device: torch.device):
        self.ckpt, self.spec = open_source(src)
        table = self.ckpt.get("model.embed_tokens.weight")
        self.device, self.dtype = device, compute_dtype(device, table.dtype)
        self.hidden = embed(self.spec, table, tokens).to(device, self.dtype)
        self.rope = rope_tables(self.spec, tokens.shape[1], device, self.dtype)

    def advance(self, layer: int) -> None:
        w = {k: v.to(self.device, self.dtype) for k, v in self.ckpt.layer_tensors(layer).items()}
        self.hidden = decoder_layer(self.spec, layer, w, self.hidden, self.rope)

    def load_head(self) -> None:
        """Final norm and LM head, read once after the last layer."""
        head = "model.embed_tokens.weight" if self.spec.tie_embeddings else "lm_head.weight"
        self.norm = self.ckpt.get("model.norm.weight").to(self.device, self.dtype)
        self.lm_head = self.ckpt.get(head).to(self.device, self.dtype)

    def log_probs(self, sequence: int) -> torch.Tensor:
        """[S, V] next-token log-probabilities of one sequence."""
        logits = final_logits(self.spec, self.norm, self.lm_head, self.hidden[sequence])
        return F.log_softmax(logits, -1)


def evaluate(original: str, reduced: str, text: Path, seq_len: int = 512, samples: int = 64,
             device: str = "auto", progress: bool = True) -> Fidelity:
    ckpt, _ = open_source(original)
    tokens = calibration_tokens(read_documents(text), TextTokenizer(ckpt.root), samples,
                                seq_len, seed=0)
    torch_device = pick_device(device)
    models = [StreamedModel(original, tokens, torch_device),
              StreamedModel(reduced, tokens, torch_device)]
    _check_compatible(*(m.spec for m in models))
    for layer in tqdm(range(models[0].spec.num_layers), desc="eval", disable=not progress,
                      file=sys.stderr):
        for model in models:
            model.advance(layer)
    for model in models:
        model.load_head()
    return _score(models, tokens)


def _check_compatible(a: ModelSpec, b: ModelSpec) -> None:
    if (a.num_layers, a.hidden) != (b.num_layers, b.hidden):
        raise UserError("the two models differ in depth or width: not an original and its "
                        "reduction")


def _score(models: list[StreamedModel], tokens: torch.Tensor) -> Fidelity:
    nll = torch.zeros(2, dtype=torch.float64)
    kl = 0.0
    count = 0
    for i in range(tokens.shape[0]):
        target = tokens[i, 1:].to(models[0].device)
        orig, red = (m.log_probs(i)[:-1] for m in models)
        for k, lp in enumerate((orig, red)):
            nll[k] += -lp.gather(1, target[:, None]).sum().item()
        kl += (orig.exp() * (orig - red)).sum().item()
        count += target.numel()
    ppl = torch.exp(nll / count)
    return Fidelity(count, ppl[0].item(), ppl[1].item(), kl / count)
