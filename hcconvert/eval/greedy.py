"""Long greedy continuations of held-out prompts, and what they show that teacher-forced scores
hide: a reduced model can follow the original token by token on given text and still fall into
repetition loops once it writes on its own (reported for a 50 % REAP of Kimi-K2.6).

Each model continues the same prompts greedily for CONTINUATION_TOKENS tokens, streamed one
decoder layer at a time with a KV cache: a step feeds only the new tokens through each layer
(its weights read again, beyond the first KEEP_BYTES of built layers: never more of a big
model held), and transformers' own cache object, of the kind the family's forward makes,
keeps every layer's keys and values (or linear-attention state). Scored per continuation: the
share of repeated 4-grams (Welleck et al. 2019's seq-rep-4, which a loop drives to 1),
distinct bigrams over a set of continuations (Li et al. 2016's distinct-2) and the leading
tokens equal to the original's own continuation; evaluate.py adds the original model's
perplexity of the text (REAP's cross-perplexity).
P prompts, S prompt tokens, G generated tokens.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm import tqdm

from ..model.experts import RoutedExperts
from .streamed import CheckpointLayers, StreamedModel, stream_side_by_side

# Prompts per evaluation source, their length, and the continuation's.
PROMPTS = 8
PROMPT_TOKENS = 64
CONTINUATION_TOKENS = 128
# Built layers kept between steps, in all, rather than read and built again for every token:
# a small model's whole decoder (the bench models', the demo's), a big one's first few layers.
KEEP_BYTES = 10**9
# The n of the repeated n-grams (a loop's signature) and of distinct-n (lexical variety).
REPEAT_N = 4
DISTINCT_N = 2


@torch.no_grad()
def greedy_continuation(layers: CheckpointLayers, prompts: torch.Tensor,
                        steps: int = CONTINUATION_TOKENS, progress: bool = True,
                        label: str = "") -> torch.Tensor:
    """[P, S + steps] prompts [P, S] followed by the model's greedy continuation: one pass
    over its layers per token, each feeding only the new tokens, so it shows its progress.
    The weights are checked for NaN on the first pass only (each later pass reads the same).
    Families whose cached step is not known to match the full forward
    (Family.cached_generation) recompute the whole sequence at every step instead."""
    if not layers.spec.family.cached_generation:
        return recomputed_continuation(layers, prompts, steps, progress, label)
    decoder, device = layers.decoder, layers.device
    layers.load_head()  # the embedding and the head serve every step
    new, cache, written = prompts.to(device), None, [prompts]
    kept: dict[int, nn.Module] = {}  # built layers kept between steps, up to KEEP_BYTES
    for step in tqdm(range(steps), desc=f"greedy continuation{label}", unit="token",
                     disable=not progress, file=sys.stderr):
        hidden, arguments, cache = decoder.cached_inputs(new, cache)
        state = None  # what a layer hands the next (family.carried)
        for layer in range(layers.spec.num_layers):
            module = kept[layer] if layer in kept else layers.module(layer, check=step == 0)
            if step == 0 and sum(map(held_bytes, kept.values())) + held_bytes(module) \
                    <= KEEP_BYTES:
                kept[layer] = module
            hidden, state = _run(module, hidden, arguments[decoder.skeleton_layer(layer)],
                                 decoder.family.carried, state)
        new = decoder.logits(new, hidden)[:, -1].argmax(-1, keepdim=True)
        written.append(new.cpu())
    decoder.drop_globals()
    return torch.cat(written, dim=1)


def recomputed_continuation(layers: CheckpointLayers, prompts: torch.Tensor,
                            steps: int = CONTINUATION_TOKENS, progress: bool = True,
                            label: str = "") -> torch.Tensor:
    """greedy_continuation without a cache: every step streams the whole sequence through
    the model's full forward, as evaluation does (slower by the sequence's length)."""
    tokens = prompts
    for _ in tqdm(range(steps), desc=f"greedy continuation{label} (recomputed)", unit="token",
                  disable=not progress, file=sys.stderr):
        model = StreamedModel(layers.ckpt, layers.spec, tokens, layers.device,
                              layers.decoder.dtype)
        stream_side_by_side([model], lambda every: every)
        last = torch.stack([model.log_probs(row)[-1] for row in range(tokens.shape[0])])
        tokens = torch.cat((tokens, last.argmax(-1, keepdim=True).cpu()), dim=1)
    return tokens


def held_bytes(module: nn.Module) -> int:
    """Bytes of a built layer's tensors, its routed experts included."""
    tensors = list(module.state_dict().values())
    tensors += [tensor for part in module.modules() if isinstance(part, RoutedExperts)
                for tensor in part.stacked.parts().values()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _run(module, hidden: torch.Tensor, arguments: dict, carried: str | None, state):
    """One layer on hidden; the state it hands the next layer where the family carries one."""
    if carried is None:
        return module(hidden, **arguments), None
    return module(hidden, **{**arguments, carried: state})


def matched_lengths(continued: torch.Tensor, reference: torch.Tensor, steps: int) -> torch.Tensor:
    """[P] leading tokens of the last `steps` of continued [P, S + steps] equal to reference's."""
    agree = continued[:, -steps:] == reference[:, -steps:]
    # cumprod turns [1, 1, 0, 1] into [1, 1, 0, 0]: only the leading run counts.
    return agree.int().cumprod(dim=1).sum(dim=1)


def ngrams(tokens: torch.Tensor, n: int) -> list[tuple[int, ...]]:
    values = tokens.tolist()
    return [tuple(values[i:i + n]) for i in range(len(values) - n + 1)]


def repeated_share(continuation: torch.Tensor, n: int = REPEAT_N) -> float:
    """The share of the continuation's n-grams that it already wrote earlier (0: none repeats;
    a loop of period p <= n tends to 1)."""
    grams = ngrams(continuation, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_share(continuations: list[torch.Tensor], n: int = DISTINCT_N) -> float:
    """Distinct n-grams over all n-grams of the continuations together."""
    grams = [gram for continuation in continuations for gram in ngrams(continuation, n)]
    return len(set(grams)) / len(grams) if grams else 0.0
