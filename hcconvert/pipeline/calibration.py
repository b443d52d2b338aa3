"""Calibration text: read documents, tokenize with the model's tokenizer, cut fixed-length samples.

The paper calibrates on C4 (`en/c4-train.00000-of-01024.json.gz`), 32 samples of 2048 tokens,
seed 42. Documents are shuffled with the seed, tokenized one after another (each opened with
BOS where the tokenizer config asks for it) and the token stream is cut into samples.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
import zlib
from collections.abc import Callable, Iterator
from json.decoder import scanstring
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from tokenizers import Tokenizer

from ..errors import UserError, first_line
from ..model.families import family_for
from ..model.tiktoken_vocab import TiktokenVocab, tiktoken_tokenizer

if TYPE_CHECKING:
    from ..io.source import Checkpoint

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


def read_documents(path: Path, max_chars: int, kind: str = "calibration",
                   reader: JsonText | None = None) -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl/.json(.gz) with a text field (or
    chat messages, see JsonText), each cut to its first max_chars characters; the file is read
    in chunks, so memory is bounded by max_chars and MAX_TEXT_CHARS, not by the file's size or
    its longest line. kind names the text in messages (eval reads held-out text)."""
    if not path.exists() or path.is_dir():  # a pipe is fine: --calib <(zcat text.gz)
        raise UserError(f"{kind} file {path} does not exist or is a directory")
    if path.is_file() and not _known_type(path):  # a pipe has no name to go by: read as text
        raise UserError(f"{kind} file {path}: unknown file type; use .txt, .jsonl or .json "
                        "(each also as .gz)")
    try:
        docs = list(_bounded(_iter_documents(path, max_chars, reader or JsonText())))
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


TEXT_TYPES = (".txt", ".text", ".md")
JSON_TYPES = (".jsonl", ".json")


def _known_type(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(TEXT_TYPES + JSON_TYPES)


def _iter_documents(path: Path, max_chars: int, reader: JsonText) -> Iterator[str]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if not name.removesuffix(".gz").endswith(JSON_TYPES):
            yield from (piece for piece, _ in _pieces(f, "\n\n", max_chars))
            return
        line_chars = JSON_CHARS_PER_CHAR * max_chars + JSON_LINE_SLACK
        for number, (line, cut) in enumerate(_pieces(f, "\n", line_chars), start=1):
            if line.strip():
                yield reader(line, cut, number)


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


class JsonText:
    """The document of one JSON line: its text field (--text-field, default "text"), or, for
    a chat-format line without one, its "messages" rendered with the model's chat template."""

    def __init__(self, field: str = "text", chat_template: Callable[[list], str] | None = None):
        self.field, self.chat_template = field, chat_template

    def __call__(self, line: str, cut: bool, number: int) -> str:
        if cut:  # too long to parse whole: the start of its text field
            text = _text_prefix(line, number, self.field)
        else:
            text = self._whole(json.loads(line), number)
        if not isinstance(text, str):
            raise ValueError(f'line {number}: "{self.field}" is {json.dumps(text)[:20]}, '
                             "not a string")
        return text

    def _whole(self, record: object, number: int):
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not a JSON object")
        if self.field in record:
            return record[self.field]
        if isinstance(record.get("messages"), list):
            if self.chat_template is None:
                raise ValueError(f'line {number} holds chat "messages" but the model has no '
                                 "chat template")
            return self.chat_template(record["messages"])
        raise ValueError(f'line {number} has no "{self.field}" field (nor chat "messages")')


def _text_prefix(line: str, number: int, field: str) -> str:
    """The start of the field's string of a JSON object cut short: the members before it
    must be whole, the string itself may be cut anywhere."""
    if line[_skip_space(line, 0):][:1] != "{":
        raise ValueError(f"line {number} is not a JSON object")
    try:
        start = _value_start(line, field)
    except ValueError:  # a member before the field runs past the part of the line kept
        start = None
    if start is None:
        raise ValueError(f'line {number} has no "{field}" field in its first {len(line)} '
                         "characters")
    if line[start:start + 1] != '"':
        raise ValueError(f'line {number}: "{field}" is not a string')
    return _string_prefix(line[start + 1:])


def _value_start(line: str, field: str) -> int | None:
    """Where the value of the top-level member `field` starts; None if no such member."""
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
        if key == field:
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


def no_tokenizer(location: str, tiktoken: bool) -> UserError:
    """The refusal of a checkpoint without tokenizer.json; tiktoken: it ships tiktoken.model
    instead, which hcconvert reads only for the families that declare how (Kimi-K2's)."""
    found = (": it ships tiktoken.model, which hcconvert reads only for Kimi-K2's families; "
             "add a tokenizer.json of the same vocabulary beside it" if tiktoken else "")
    return UserError(f"{location} has no tokenizer.json (needed for calibration text){found}")


class TextTokenizer:
    """The model's tokenizer.json (or, where the family says how, its tiktoken.model); BOS as
    its post-processor adds it, and also where tokenizer_config.json sets add_bos_token
    (Llama-style tokenizers add BOS that way). With embedding_rows given, every token id must
    index the model's embedding table."""

    def __init__(self, model_dir: Path, embedding_rows: int | None = None,
                 tiktoken: TiktokenVocab | None = None):
        path, vocab = model_dir / "tokenizer.json", model_dir / "tiktoken.model"
        if not path.is_file() and not (tiktoken is not None and vocab.is_file()):
            raise no_tokenizer(str(model_dir), vocab.is_file())
        try:
            config_path = model_dir / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            if not isinstance(config, dict):
                raise ValueError("tokenizer_config.json is not a JSON object")
            self.tokenizer = (Tokenizer.from_file(str(path)) if path.is_file() else
                              tiktoken_tokenizer(vocab, tiktoken, _special_names(config)))
        except UserError:
            raise
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot read the tokenizer in {model_dir}: {err}") from None
        # A saved truncation or padding setting would cut or pad every document.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_id = self._bos_id(config)
        self.template = _chat_template(model_dir, config)
        self.special_tokens = {key: _token_text(config.get(key))
                               for key in ("bos_token", "eos_token")}
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

    def render_chat(self, messages: list) -> str:
        """A chat-format document as the model sees it: its chat template applied."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered = render_jinja_template([messages], chat_template=self.template,
                                             **self.special_tokens)
        except Exception as err:  # jinja2's errors vary: a template error, bad messages
            raise ValueError(f"the chat template cannot render these messages: "
                             f"{first_line(err)}") from None
        return rendered[0][0] if isinstance(rendered, tuple) else rendered[0]

    def json_reader(self, field: str) -> JsonText:
        """How this model reads a JSON line: field, or chat messages through its template."""
        return JsonText(field, self.render_chat if self.template else None)

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
                            f"table of {self.embedding_rows} rows: the tokenizer does not "
                            "belong to this model")


def _special_names(config: dict) -> dict[int, str]:
    """tokenizer_config.json's added tokens by id."""
    added = config.get("added_tokens_decoder") or {}
    return {int(i): _token_text(token) for i, token in added.items()}


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """The model's default chat template: chat_template.jinja beside the tokenizer, or
    tokenizer_config.json's (a string, or named templates of which "default" is used)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


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
        raise UserError(f"{kind} text has {len(stream)} tokens, fewer than one {seq_len}-token "
                        "sample: give more text or a smaller --seq-len")
    if count < samples:
        print(f"warning: {kind} text gives only {count} of {samples} samples",
              file=sys.stderr)
    tokens = torch.tensor(stream[:count * seq_len], dtype=torch.long).view(count, seq_len)
    tokenizer.check_ids(tokens)
    return tokens


def text_tokens(path: Path, tokenizer: TextTokenizer, samples: int, seq_len: int,
                seed: int, kind: str = "calibration", field: str = "text") -> torch.Tensor:
    """calibration_tokens of a text file, reading no more of each document than it can need;
    kind names the text in messages, field the text field of JSON lines."""
    docs = read_documents(path, tokenizer.chars_for(samples * seq_len), kind,
                          tokenizer.json_reader(field))
    return calibration_tokens(docs, tokenizer, samples, seq_len, seed, kind)


def embedding_rows(ckpt: Checkpoint) -> int | None:
    """Rows of the checkpoint's embedding table (its vocabulary), from the header."""
    embedding = ckpt.tensors.get(EMBEDDING)
    return embedding.shape[0] if embedding is not None and embedding.shape else None


def model_tokenizer(ckpt: Checkpoint, check_rows: bool = True) -> TextTokenizer:
    """The checkpoint's tokenizer, checked against its embedding table with check_rows."""
    return TextTokenizer(ckpt.root, embedding_rows(ckpt) if check_rows else None,
                         family_for(ckpt.config).tiktoken)


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
