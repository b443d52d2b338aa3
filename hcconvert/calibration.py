"""Calibration text: read documents, tokenize with the model's tokenizer, cut fixed-length samples.

The paper calibrates on C4 (`en/c4-train.00000-of-01024.json.gz`), 32 samples of 2048 tokens,
seed 42. Documents are shuffled with the seed, tokenized one after another (each opened with
BOS where the tokenizer config asks for it) and the token stream is cut into samples.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import UserError

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
# Documents read from the head of a calibration file: C4's first shard alone holds ~356k,
# and 20k documents give far more than 32 x 2048 tokens after shuffling.
MAX_DOCUMENTS = 20_000


def default_calibration_file() -> Path:
    """The paper's C4 shard, from the HF cache or the Hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(C4_REPO, C4_FILE, repo_type="dataset"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise UserError(f"cannot fetch the default calibration text ({C4_REPO}/{C4_FILE}): "
                        "offline? pass --calib FILE (.jsonl, .txt or .json.gz)") from None


def read_documents(path: Path, kind: str = "calibration") -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl/.json(.gz) with a "text" field;
    kind names the text in messages (eval reads held-out text)."""
    if not path.is_file():
        raise UserError(f"{kind} file {path} does not exist")
    try:
        docs = list(_iter_documents(path))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
            AttributeError) as err:
        raise UserError(f"cannot read {kind} file {path}: {err}") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{kind} file {path} holds no text")
    return docs


def _iter_documents(path: Path) -> Iterator[str]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    stem = name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith((".jsonl", ".json")):
            for count, line in enumerate(f):
                if count >= MAX_DOCUMENTS:
                    break
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            yield from f.read().split("\n\n")[:MAX_DOCUMENTS]


class TextTokenizer:
    """The model's tokenizer.json; BOS as its post-processor adds it, and also where
    tokenizer_config.json sets add_bos_token (Llama-style tokenizers add BOS that way)."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{model_dir} has no tokenizer.json (needed for calibration text)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            config_path = model_dir / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot read the tokenizer in {model_dir}: {err}") from None
        # A saved truncation or padding setting would cut or pad every document.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_id = self._bos_id(config)

    def _bos_id(self, config: dict) -> int | None:
        bos = config.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if not bos or config.get("add_bos_token") is not True:
            return None
        return self.tokenizer.token_to_id(bos)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids


def calibration_tokens(docs: list[str], tokenizer: TextTokenizer, samples: int, seq_len: int,
                       seed: int, kind: str = "calibration") -> torch.Tensor:
    """[N, S] token ids: shuffled documents, concatenated, cut into N <= samples sequences."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer.encode(docs[i]))
        if len(stream) >= samples * seq_len:
            break
    if not stream:
        raise UserError(f"{kind} text tokenizes to nothing")
    count = min(samples, len(stream) // seq_len)
    if count == 0:
        print(f"warning: {kind} text has {len(stream)} tokens, fewer than one "
              f"{seq_len}-token sample; using one shorter sample", file=sys.stderr)
        return torch.tensor([stream], dtype=torch.long)
    if count < samples:
        print(f"warning: {kind} text gives only {count} of {samples} samples",
              file=sys.stderr)
    return torch.tensor(stream[:count * seq_len], dtype=torch.long).view(count, seq_len)


def load_calibration(model_dir: Path, calib: str | None, samples: int, seq_len: int,
                     seed: int) -> torch.Tensor:
    tokenizer = TextTokenizer(model_dir)
    path = Path(calib) if calib else default_calibration_file()
    return calibration_tokens(read_documents(path), tokenizer, samples, seq_len, seed)
