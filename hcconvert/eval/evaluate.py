"""Fidelity of a reduced model: perplexity of both models, KL(original ‖ reduced), how often
its next-token argmax agrees with the original's, and its long greedy continuations (greedy.py):
how far they follow the original's own, how often they repeat themselves, how varied they are
and how likely the original model finds them. With several evaluation texts
(`--eval code.jsonl,prose.txt`) every score is also given per text: the calibration domain
decides what a reduced model keeps.

Every checkpoint streams through the held-out tokens one decoder layer at a time, so the
check needs no more memory than a conversion. N sequences, S tokens, P prompts, G generated
tokens, M reduced models.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError
from ..io.source import Checkpoint
from ..model.decoder import pick_device
from ..model.spec import ModelSpec, open_source
from ..model.tokenizer import embedding_rows, model_tokenizer
from ..pipeline.calibration import text_tokens
from ..pipeline.plan import validate_tensors
from . import greedy
from .streamed import CheckpointLayers, StreamedModel, stream_side_by_side


@dataclass(frozen=True)
class Fidelity:
    tokens: int
    perplexity_original: float
    perplexity_reduced: float
    kl: float  # mean over predicted positions, nats
    top1_agreement: float  # share of positions where both models' argmax agree
    # Over the greedy continuations of the held-out prompts (greedy.py):
    greedy_match: float | None = None  # mean leading tokens equal to the original's
    repetition: float | None = None  # mean share of repeated 4-grams in a continuation
    repetition_original: float | None = None  # the same of the original's continuations
    distinct: float | None = None  # distinct bigrams over all continuations
    distinct_original: float | None = None
    generated_perplexity: float | None = None  # the original's perplexity of the continuations
    generated_perplexity_original: float | None = None  # ... of its own continuations
    sources: dict[str, Fidelity] | None = None  # per evaluation text, when there are several


@dataclass(frozen=True)
class HeldOut:
    """The evaluation texts' held-out sequences [N, S] and greedy prompts [P, S'], each text's
    rows of both by its name."""

    tokens: torch.Tensor
    prompts: torch.Tensor
    rows: dict[str, slice]
    prompt_rows: dict[str, slice]


@dataclass(frozen=True)
class Forced:
    """Per held-out sequence, summed over its predicted positions: the original's and each
    reduction's negative log-likelihood, KL and argmax agreements [M, N]."""

    nll_original: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    agree: torch.Tensor
    positions: int  # predicted positions per sequence


@dataclass(frozen=True)
class Written:
    """Every model's greedy continuations [1 + M, P, S' + G], the original's first, and the
    original model's negative log-likelihood of each continuation's G tokens [1 + M, P]."""

    tokens: torch.Tensor
    nll: torch.Tensor


def evaluate(original: str, reduced: str, text: Path | Sequence[Path], seq_len: int = 512,
             samples: int = 64, device: str = "auto", progress: bool = True) -> Fidelity:
    return evaluate_many(original, [reduced], text, seq_len, samples, device, progress)[0]


def evaluate_many(original: str, reduced: list[str], text: Path | Sequence[Path],
                  seq_len: int = 512, samples: int = 64, device: str = "auto",
                  progress: bool = True) -> list[Fidelity]:
    """Score several reductions of one original on `samples` sequences of each text: the
    original streams through the layers once, beside all of them."""
    torch_device = pick_device(device)
    ckpt, spec = open_source(original)
    others = [open_source(src) for src in reduced]
    for other, other_spec in others:
        _check_compatible(ckpt, spec, other, other_spec)
    held = held_out(ckpt, text_paths(text), samples, seq_len)
    reference = StreamedModel(ckpt, spec, held.tokens, torch_device)
    models = [StreamedModel(*other, held.tokens, torch_device) for other in others]
    stream_side_by_side([reference, *models], _bar("eval", progress))
    forced = _forced(reference, models, held.tokens)
    del reference, models  # the continuations stream their own, shorter sequences
    written = _written([(ckpt, spec), *others], held.prompts, torch_device, progress)
    return [_fidelity(held, forced, written, m) for m in range(len(reduced))]


def text_paths(text: Path | Sequence[Path]) -> list[Path]:
    """One evaluation text or several, as a list."""
    return [Path(text)] if isinstance(text, (str, Path)) else [Path(t) for t in text]


def source_names(paths: list[Path]) -> list[str]:
    """Each text's name in the tables: its file name, or its path where two share a name."""
    names = [path.name for path in paths]
    return [str(path) if names.count(path.name) > 1 else path.name for path in paths]


def held_out_tokens(ckpt: Checkpoint, text: Path, samples: int, seq_len: int) -> torch.Tensor:
    """[N, S] evaluation tokens of text (the same for every model scored against ckpt)."""
    tokens = text_tokens(text, model_tokenizer(ckpt), samples, seq_len, seed=0,
                         kind="held-out")
    if tokens.shape[1] < 2:
        raise UserError(f"{text} gives {tokens.shape[1]} token: nothing to predict")
    return tokens


def held_out(ckpt: Checkpoint, texts: list[Path], samples: int, seq_len: int) -> HeldOut:
    """`samples` sequences of each text, and its first PROMPTS sequences' starts as prompts."""
    parts = [held_out_tokens(ckpt, text, samples, seq_len) for text in texts]
    prompts = [part[:greedy.PROMPTS, :greedy.PROMPT_TOKENS] for part in parts]
    names = source_names(texts)
    return HeldOut(torch.cat(parts), torch.cat(prompts), _rows(names, parts),
                   _rows(names, prompts))


def _rows(names: list[str], parts: list[torch.Tensor]) -> dict[str, slice]:
    bounds, start = {}, 0
    for name, part in zip(names, parts, strict=True):
        bounds[name] = slice(start, start + part.shape[0])
        start += part.shape[0]
    return bounds


def _bar(label: str, progress: bool):
    return partial(tqdm, desc=label, unit="layer", disable=not progress, file=sys.stderr)


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


def _forced(reference: StreamedModel, models: list[StreamedModel],
            tokens: torch.Tensor) -> Forced:
    """Forced's sums for every held-out sequence, teacher-forced."""
    count = tokens.shape[0]
    nll_original = torch.zeros(count, dtype=torch.float64)
    nll, kl, agree = (torch.zeros(len(models), count, dtype=torch.float64) for _ in range(3))
    for i in range(count):
        target = tokens[i, 1:, None].to(reference.device)
        orig = reference.log_probs(i)[:-1]
        nll_original[i] = -orig.gather(1, target).sum().item()
        for k, model in enumerate(models):
            red = model.log_probs(i)[:-1]
            nll[k, i] = -red.gather(1, target).sum().item()
            kl[k, i] = (orig.exp() * (orig - red)).sum().item()
            agree[k, i] = (orig.argmax(-1) == red.argmax(-1)).sum().item()
    return Forced(nll_original, nll, kl, agree, tokens.shape[1] - 1)


def _written(models: list[tuple[Checkpoint, ModelSpec]], prompts: torch.Tensor,
             device: torch.device, progress: bool) -> Written:
    """Each model's greedy continuations of the prompts, then the original (the first) reads
    them all in one streamed pass to score how likely it finds them."""
    continuations = torch.stack([
        greedy.greedy_continuation(CheckpointLayers(ckpt, spec, device), prompts,
                                   progress=progress, label=f" {i + 1}/{len(models)}")
        for i, (ckpt, spec) in enumerate(models)])
    judge = StreamedModel(*models[0], continuations.flatten(0, 1), device)
    stream_side_by_side([judge], _bar("scoring the continuations", progress))
    start = prompts.shape[1]
    nll = torch.zeros(continuations.shape[0] * continuations.shape[1], dtype=torch.float64)
    for i, row in enumerate(continuations.flatten(0, 1)):
        target = row[start:, None].to(device)
        nll[i] = -judge.log_probs(i)[start - 1:-1].gather(1, target).sum().item()
    return Written(continuations, nll.view(continuations.shape[:2]))


def _fidelity(held: HeldOut, forced: Forced, written: Written, model: int) -> Fidelity:
    """Reduction `model`'s scores over every text, and over each where there are several."""
    everything = _scores(forced, written, model, slice(None), slice(None))
    if len(held.rows) == 1:
        return everything
    sources = {name: _scores(forced, written, model, held.rows[name], held.prompt_rows[name])
               for name in held.rows}
    return dataclasses.replace(everything, sources=sources)


def _scores(forced: Forced, written: Written, model: int, rows: slice,
            prompt_rows: slice) -> Fidelity:
    """Reduction `model`'s scores over the held-out sequences `rows` and the prompts
    `prompt_rows`."""
    positions = forced.nll_original[rows].numel() * forced.positions
    steps = greedy.CONTINUATION_TOKENS
    ours, theirs = (written.tokens[model + 1, prompt_rows, -steps:],
                    written.tokens[0, prompt_rows, -steps:])
    generated = ours.shape[0] * steps
    return Fidelity(
        tokens=positions,
        perplexity_original=_perplexity(forced.nll_original[rows].sum(), positions),
        perplexity_reduced=_perplexity(forced.nll[model, rows].sum(), positions),
        kl=forced.kl[model, rows].sum().item() / positions,
        top1_agreement=forced.agree[model, rows].sum().item() / positions,
        greedy_match=greedy.matched_lengths(ours, theirs, steps).float().mean().item(),
        repetition=_mean(greedy.repeated_share(row) for row in ours),
        repetition_original=_mean(greedy.repeated_share(row) for row in theirs),
        distinct=greedy.distinct_share(list(ours)),
        distinct_original=greedy.distinct_share(list(theirs)),
        generated_perplexity=_perplexity(written.nll[model + 1, prompt_rows].sum(), generated),
        generated_perplexity_original=_perplexity(written.nll[0, prompt_rows].sum(), generated))


def _perplexity(nll: torch.Tensor, positions: int) -> float:
    return torch.exp(nll / positions).item()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
