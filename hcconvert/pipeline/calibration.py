"""Calibration text: read documents, tokenize with the model's tokenizer, cut fixed-length samples.

The paper calibrates on C4 (`en/c4-train.00000-of-01024.json.gz`), 32 samples of 2048 tokens,
seed 42. Documents are shuffled with the seed, tokenized one after another (each opened with
BOS where the tokenizer config asks for it) and the token stream is cut into samples.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..errors import UserError, warn
from ..io.source import Checkpoint
from ..io.text import read_documents
from ..model.tokenizer import TextTokenizer, model_tokenizer

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"


def default_calibration_file() -> Path:
    """The paper's C4 shard, from the HF cache or the Hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(C4_REPO, C4_FILE, repo_type="dataset"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise UserError(f"cannot fetch the default calibration text ({C4_REPO}/{C4_FILE}): "
                        "offline? pass --calib FILE (.jsonl, .txt or .json.gz)") from None


def calibration_tokens(docs: list[str], tokenizer: TextTokenizer, samples: int, seq_len: int,
                       seed: int, what: str = "calibration text") -> torch.Tensor:
    """[N, S] token ids: shuffled documents, concatenated, cut into N <= samples sequences;
    what names the text in messages."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer.encode(docs[i]))
        if len(stream) >= samples * seq_len:
            break
    if not stream:
        raise UserError(f"{what} tokenizes to nothing")
    count = min(samples, len(stream) // seq_len)
    if count == 0:
        raise UserError(f"{what} has {len(stream)} tokens, fewer than one {seq_len}-token "
                        "sample: give more text or a smaller --seq-len")
    if count < samples:
        warn(f"{what} gives only {count} of {samples} samples")
    tokens = torch.tensor(stream[:count * seq_len], dtype=torch.long).view(count, seq_len)
    tokenizer.check_ids(tokens)
    return tokens


def text_tokens(path: Path, tokenizer: TextTokenizer, samples: int, seq_len: int,
                seed: int, kind: str = "calibration", field: str = "text") -> torch.Tensor:
    """calibration_tokens of a text file, reading no more of each document than it can need;
    kind names the text in messages (with the file's name), field the text field of JSON
    lines."""
    docs = read_documents(path, tokenizer.chars_for(samples * seq_len), kind,
                          tokenizer.json_reader(field))
    return calibration_tokens(docs, tokenizer, samples, seq_len, seed,
                              f"{kind} text {path.name}")


def calibration_path(calib: str) -> Path:
    """--calib as a path; an empty one is bad input (Path("") would be the working directory)."""
    if calib == "":
        raise UserError("--calib is empty: name a .jsonl, .json.gz or .txt file")
    return Path(calib)


def calibration_sources(calib: str) -> list[tuple[Path, float]]:
    """--calib's files and their weights: "FILE" or "FILE:W,FILE:W,..." (weights default to
    1; mixed in proportion)."""
    sources = []
    for entry in calib.split(",") if calib else [calib]:
        path, _, weight = entry.rpartition(":")
        try:
            share = float(weight) if path else 1.0
        except ValueError:  # a colon in the path itself
            path, share = entry, 1.0
        if not 0 < share < math.inf:
            raise UserError(f"--calib {entry!r}: a weight must be a positive finite number")
        sources.append((calibration_path((path or entry).strip()), share))
    return sources


def absolute_sources(calib: str | None) -> str | None:
    """--calib with every file named by its absolute path, so hcconvert.json, the model card's
    command and a --recipe replay do not depend on the working directory."""
    if calib is None:
        return None
    return ",".join(f"{path.absolute()}:{weight!r}" if "," in calib else str(path.absolute())
                    for path, weight in calibration_sources(calib))


def sample_counts(weights: list[float], samples: int) -> list[int]:
    """samples split in proportion to weights, each source at least one: one each, then the
    rest by largest remainders."""
    if samples < len(weights):
        raise UserError(f"--calib mixes {len(weights)} sources: --calib-samples must be at "
                        f"least {len(weights)}")
    rest = samples - len(weights)
    if not math.isfinite(rest * max(weights) + sum(weights)):  # weights near fp64's limit
        weights = [w / max(weights) for w in weights]
    exact = [rest * w / sum(weights) for w in weights]
    counts = [1 + int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder[:samples - sum(counts)]:
        counts[i] += 1
    return counts


def load_calibration(ckpt: Checkpoint, calib: str | None, samples: int, seq_len: int,
                     seed: int, field: str = "text") -> torch.Tensor:
    """[N, S] calibration tokens: from --calib's sources, each cut into its share of the
    samples (calibration_sources), or from the paper's C4 shard."""
    tokenizer = model_tokenizer(ckpt)
    if calib is None:
        return text_tokens(default_calibration_file(), tokenizer, samples, seq_len, seed,
                           field=field)
    sources = calibration_sources(calib)
    counts = sample_counts([weight for _, weight in sources], samples)
    return torch.cat([text_tokens(path, tokenizer, count, seq_len, seed, field=field)
                      for (path, _), count in zip(sources, counts, strict=True)])
