"""How long a reduced model keeps writing what the original writes.

Teacher-forced KL can hide damage that shows only when a model generates. The original's
greedy continuation of a few held-out prompts is produced by G streamed passes (one new token
per pass, so no KV cache is needed); each reduced model then reads prompt + continuation once,
and the leading positions where its argmax equals the original's next token are exactly the
tokens its own greedy continuation would share with the original's.
P prompts, S prompt tokens, G generated tokens, V vocabulary.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

# Few, short prompts and a short continuation: the original streams G times over them.
PROMPTS = 8
PROMPT_TOKENS = 64
CONTINUATION_TOKENS = 16


def streamed_log_probs(models: list, tokens: torch.Tensor, open_model,
                       layers: int) -> Iterator[torch.Tensor]:
    """[N, S, V] next-token log-probabilities of each model (a checkpoint source, opened by
    open_model(source, tokens)) on tokens [N, S], in turn; the models stream side by side."""
    streamed = [open_model(model, tokens) for model in models]
    for layer in range(layers):
        for model in streamed:
            model.advance(layer)
    for model in streamed:
        model.load_head()
        yield torch.stack([model.log_probs(i) for i in range(tokens.shape[0])])


def greedy_continuation(original, prompts: torch.Tensor, open_model, layers: int,
                        steps: int = CONTINUATION_TOKENS, progress: bool = True) -> torch.Tensor:
    """[P, S + steps] prompts [P, S] followed by the original's greedy continuation: a pass
    over the original's weights per token, so it shows its progress."""
    tokens = prompts
    for _ in tqdm(range(steps), desc="greedy continuation", unit="token", disable=not progress,
                  file=sys.stderr):
        (log_probs,) = streamed_log_probs([original], tokens, open_model, layers)
        tokens = torch.cat((tokens, log_probs[:, -1].argmax(-1, keepdim=True).cpu()), dim=1)
    return tokens


def matched_lengths(log_probs: torch.Tensor, continued: torch.Tensor, steps: int) -> torch.Tensor:
    """[P] leading continuation tokens a model's argmax reproduces, from its log_probs
    [P, S + steps, V] on continued [P, S + steps] (the last `steps` tokens generated)."""
    start = continued.shape[1] - steps
    predicted = log_probs[:, start - 1:-1].argmax(-1).cpu()  # [P, steps]: next-token guesses
    agree = predicted == continued[:, start:]
    # cumprod turns [1, 1, 0, 1] into [1, 1, 0, 0]: only the leading run counts.
    return agree.int().cumprod(dim=1).sum(dim=1)
