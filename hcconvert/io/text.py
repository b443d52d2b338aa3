"""Text files read as documents: .txt (blank-line separated), .jsonl / .json with a text field
or chat messages, each also gzipped. Files are read in chunks and every document only as far as
its caller can need, so memory does not grow with the file or its longest line."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from json.decoder import scanstring
from pathlib import Path
from typing import TextIO

from ..errors import UserError, first_line

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
