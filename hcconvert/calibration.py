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
import zlib
from collections.abc import Iterator
from json.decoder import scanstring
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from tokenizers import Tokenizer

from .errors import UserError, first_line

if TYPE_CHECKING:
    from .source import Checkpoint

EMBEDDING = "model.embed_tokens.weight"

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
# Documents read from the head of a calibration file: C4's first shard alone holds ~356k,
# and 20k documents give far more than 32 x 2048 tokens after shuffling.
MAX_DOCUMENTS = 20_000
# Characters kept from a file in all, whatever its size: memory stays bounded (C4's first 20k
# documents hold about 45M characters, so the paper's sample is unchanged).
MAX_TEXT_CHARS = 1 << 26
READ_CHUNK_CHARS = 1 << 20
# A JSON string can spell a character in up to 6 (\uXXXX); room for the members before "text".
JSON_CHARS_PER_CHAR = 6
JSON_LINE_SLACK = 4096


def default_calibration_file() -> Path:
    """The paper's C4 shard, from the HF cache or the Hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(C4_REPO, C4_FILE, repo_type="dataset"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise UserError(f"cannot fetch the default calibration text ({C4_REPO}/{C4_FILE}): "
                        "offline? pass --calib FILE (.jsonl, .txt or .json.gz)") from None


def read_documents(path: Path, max_chars: int, kind: str = "calibration") -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl/.json(.gz) with a "text" field, each
    cut to its first max_chars characters; the file is read in chunks, so memory is bounded
    by max_chars and MAX_TEXT_CHARS, not by the file's size or its longest line. kind names
    the text in messages (eval reads held-out text)."""
    if not path.exists() or path.is_dir():  # a pipe is fine: --calib <(zcat text.gz)
        raise UserError(f"{kind} file {path} does not exist or is a directory")
    try:
        docs = list(_bounded(_iter_documents(path, max_chars)))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError,
            RecursionError) as err:
        raise UserError(f"cannot read {kind} file {path}: {first_line(err)}") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{kind} file {path} holds no text")
    return docs


def _bounded(docs: Iterator[str]) -> Iterator[str]:
    """At most MAX_DOCUMENTS documents and MAX_TEXT_CHARS characters."""
    total = 0
    for count, doc in enumerate(docs):
        if count >= MAX_DOCUMENTS or total >= MAX_TEXT_CHARS:
            return
        doc = doc[:MAX_TEXT_CHARS - total]
        total += len(doc)
        yield doc


def _iter_documents(path: Path, max_chars: int) -> Iterator[str]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if not name.removesuffix(".gz").endswith((".jsonl", ".json")):
            yield from (piece for piece, _ in _pieces(f, "\n\n", max_chars))
            return
        line_chars = JSON_CHARS_PER_CHAR * max_chars + JSON_LINE_SLACK
        for number, (line, cut) in enumerate(_pieces(f, "\n", line_chars), start=1):
            if line.strip():
                yield _json_text(line, cut, number)


def _pieces(f: TextIO, separator: str, cap: int) -> Iterator[tuple[str, bool]]:
    """The separator-delimited pieces of a text stream, each cut to its first cap characters,
    with whether it was cut. Holds one chunk and one cut piece at a time."""
    kept, cut, pending = "", False, ""
    hold = len(separator) - 1  # a separator may straddle two chunks
    while chunk := f.read(READ_CHUNK_CHARS):
        *complete, rest = (pending + chunk).split(separator)
        for part in complete:
            yield _extend(kept, cut, part, cap)
            kept, cut = "", False
        split = max(len(rest) - hold, 0)
        kept, cut = _extend(kept, cut, rest[:split], cap)
        pending = rest[split:]
    yield _extend(kept, cut, pending, cap)


def _extend(kept: str, cut: bool, text: str, cap: int) -> tuple[str, bool]:
    room = cap - len(kept)
    if len(text) > room:
        return kept + text[:room], True
    return kept + text, cut


def _json_text(line: str, cut: bool, number: int) -> str:
    """The "text" field of one JSON line; of a line cut short, the start of it."""
    if cut:
        text = _text_prefix(line, number)
    else:
        record = json.loads(line)
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'line {number} is not a JSON object with a "text" field')
        text = record["text"]
    if not isinstance(text, str):
        raise ValueError(f'line {number}: "text" is {json.dumps(text)[:20]}, not a string')
    return text


def _text_prefix(line: str, number: int) -> str:
    """The start of the "text" string of a JSON object cut short: the members before it must
    be whole, the string itself may be cut anywhere."""
    if line[_skip_space(line, 0):][:1] != "{":
        raise ValueError(f"line {number} is not a JSON object")
    try:
        start = _text_value_start(line)
    except ValueError:  # a member before "text" runs past the part of the line kept
        start = None
    if start is None:
        raise ValueError(f'line {number} has no "text" field in its first {len(line)} '
                         "characters")
    if line[start:start + 1] != '"':
        raise ValueError(f'line {number}: "text" is not a string')
    return _string_prefix(line[start + 1:])


def _text_value_start(line: str) -> int | None:
    """Where the value of the top-level "text" member starts; None if no such member."""
    members = json.JSONDecoder()
    i = _skip_space(line, 0) + 1  # past the "{"
    while True:
        i = _skip_space(line, i)
        if line[i:i + 1] != '"':
            return None
        key, i = scanstring(line, i + 1)
        i = _skip_space(line, i)
        if line[i:i + 1] != ":":
            return None
        i = _skip_space(line, i + 1)
        if key == "text":
            return i
        _, i = members.raw_decode(line, i)
        i = _skip_space(line, i)
        if line[i:i + 1] != ",":
            return None
        i += 1


def _skip_space(line: str, i: int) -> int:
    return len(line) - len(line[i:].lstrip(" \t\r\n"))


def _string_prefix(body: str) -> str:
    """A JSON string's characters up to where body stops, dropping an escape cut in half
    (an escape is at most 6 characters: \\uXXXX)."""
    for end in range(len(body), max(len(body) - 6, 0) - 1, -1):
        try:
            return scanstring(body[:end] + '"', 0)[0]
        except ValueError:
            continue
    raise ValueError("a JSON string cut short cannot be decoded")


class TextTokenizer:
    """The model's tokenizer.json; BOS as its post-processor adds it, and also where
    tokenizer_config.json sets add_bos_token (Llama-style tokenizers add BOS that way).
    With embedding_rows given, every token id must index the model's embedding table."""

    def __init__(self, model_dir: Path, embedding_rows: int | None = None):
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{model_dir} has no tokenizer.json (needed for calibration text)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            config_path = model_dir / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot read the tokenizer in {model_dir}: {err}") from None
        if not isinstance(config, dict):
            raise UserError(f"cannot read the tokenizer in {model_dir}: tokenizer_config.json "
                            "is not a JSON object")
        # A saved truncation or padding setting would cut or pad every document.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_id = self._bos_id(config)
        self.embedding_rows = embedding_rows
        # A token spells at most this many characters of text, so a document's first
        # chars_for(n) characters give n tokens (a tokenizer that drops whitespace may
        # need more, hence the factor 2 below; fewer tokens only means fewer samples).
        self.longest_token = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)),
                                 default=1)

    def _bos_id(self, config: dict) -> int | None:
        bos = config.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if not isinstance(bos, str) or not bos or config.get("add_bos_token") is not True:
            return None
        return self.tokenizer.token_to_id(bos)

    def chars_for(self, tokens: int) -> int:
        """Characters of one document that can be needed to give this many tokens."""
        return 2 * tokens * max(self.longest_token, 1)

    def encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text).ids
        except Exception as err:  # a lone surrogate, say; tokenizers raises bare Exceptions
            raise UserError(f"calibration text cannot be tokenized: {first_line(err)}") from None
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def check_ids(self, tokens: torch.Tensor) -> None:
        top = int(tokens.max())
        if self.embedding_rows is not None and top >= self.embedding_rows:
            raise UserError(f"the tokenizer gives token id {top}, beyond the model's embedding "
                            f"table of {self.embedding_rows} rows: tokenizer.json does not "
                            "belong to this model")


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
        tokens = torch.tensor([stream], dtype=torch.long)
    else:
        if count < samples:
            print(f"warning: {kind} text gives only {count} of {samples} samples",
                  file=sys.stderr)
        tokens = torch.tensor(stream[:count * seq_len], dtype=torch.long).view(count, seq_len)
    tokenizer.check_ids(tokens)
    return tokens


def text_tokens(path: Path, tokenizer: TextTokenizer, samples: int, seq_len: int,
                seed: int, kind: str = "calibration") -> torch.Tensor:
    """calibration_tokens of a text file, reading no more of each document than it can need;
    kind names the text in messages."""
    docs = read_documents(path, tokenizer.chars_for(samples * seq_len), kind)
    return calibration_tokens(docs, tokenizer, samples, seq_len, seed, kind)


def embedding_rows(ckpt: Checkpoint) -> int | None:
    """Rows of the checkpoint's embedding table (its vocabulary), from the header."""
    embedding = ckpt.tensors.get(EMBEDDING)
    return embedding.shape[0] if embedding is not None and embedding.shape else None


def model_tokenizer(ckpt: Checkpoint) -> TextTokenizer:
    """The checkpoint's tokenizer, checked against its embedding table."""
    return TextTokenizer(ckpt.root, embedding_rows(ckpt))


def calibration_path(calib: str) -> Path:
    """--calib as a path; an empty one is bad input (Path("") would be the working directory)."""
    if calib == "":
        raise UserError("--calib is empty: name a .jsonl, .json.gz or .txt file")
    return Path(calib)


def load_calibration(ckpt: Checkpoint, calib: str | None, samples: int, seq_len: int,
                     seed: int) -> torch.Tensor:
    tokenizer = model_tokenizer(ckpt)
    path = calibration_path(calib) if calib is not None else default_calibration_file()
    return text_tokens(path, tokenizer, samples, seq_len, seed)
