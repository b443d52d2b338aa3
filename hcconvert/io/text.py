"""Text files read as documents: .txt (blank-line separated), .jsonl / .json with a text field,
an instruction/response pair or chat messages (each also gzipped), and .parquet with such
columns. Files are read in chunks (parquet in batches of rows) and every document only as far
as its caller can need, so memory does not grow with the file or its longest line."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
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

# Parquet rows turned into documents at a time: a few MB of text, whatever the row group holds.
PARQUET_BATCH_ROWS = 256


def read_documents(path: Path, max_chars: int, kind: str = "calibration",
                   reader: JsonText | None = None) -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl/.json(.gz) or .parquet with a text
    field (or a pair, or chat messages: see JsonText), each cut to its first max_chars
    characters; the file is read in chunks, so memory is bounded by max_chars and
    MAX_TEXT_CHARS, not by the file's size or its longest line. kind names the text in
    messages (eval reads held-out text)."""
    if not path.exists() or path.is_dir():  # a pipe is fine: --calib <(zcat text.gz)
        raise UserError(f"{kind} file {path} does not exist or is a directory")
    if path.is_file() and not known_type(path.name):  # a pipe has no name: read as text
        raise UserError(f"{kind} file {path}: unknown file type; use .txt, .jsonl, .json "
                        "(each also as .gz) or .parquet")
    return read_files([(f"{kind} file {path}", path)], max_chars, f"{kind} file {path}",
                      reader)


def read_files(files: Iterable[tuple[str, Path]], max_chars: int, what: str,
               reader: JsonText | None = None) -> list[str]:
    """The documents of several files read one after another as one text (a dataset split's
    files), bounded as one file's; files is (name in messages, path) pairs, taken only as far
    as the documents need (so a lazy iterable fetches no file it does not reach); what names
    the whole in messages."""
    docs = [d for d in _bounded(_documents_of(files, max_chars, reader or JsonText()))
            if d.strip()]
    if not docs:
        raise UserError(f"{what} holds no text")
    return docs


def _documents_of(files: Iterable[tuple[str, Path]], max_chars: int,
                  reader: JsonText) -> Iterator[str]:
    for name, path in files:
        try:
            yield from _iter_documents(path, max_chars, reader)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError,
                RecursionError) as err:
            raise UserError(f"cannot read {name}: {first_line(err)}") from None


def _bounded(docs: Iterator[str]) -> Iterator[str]:
    """At most MAX_DOCUMENTS documents and MAX_TEXT_CHARS characters, asking docs for none
    beyond them (the next might be in a file not fetched yet)."""
    total = 0
    for count, doc in enumerate(docs, start=1):
        doc = doc[:MAX_TEXT_CHARS - total]
        total += len(doc)
        yield doc
        if count >= MAX_DOCUMENTS or total >= MAX_TEXT_CHARS:
            return

TEXT_TYPES = (".txt", ".text", ".md")

JSON_TYPES = (".jsonl", ".json")

PARQUET_TYPE = ".parquet"


def known_type(name: str) -> bool:
    """Whether a file of this name is one hcconvert reads documents from."""
    name = name.lower()
    return (name.endswith(PARQUET_TYPE)
            or name.removesuffix(".gz").endswith(TEXT_TYPES + JSON_TYPES))


def _iter_documents(path: Path, max_chars: int, reader: JsonText) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(PARQUET_TYPE):
        yield from _parquet_documents(path, max_chars, reader)
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if not name.removesuffix(".gz").endswith(JSON_TYPES):
            yield from (piece for piece, _ in _pieces(f, "\n\n", max_chars))
            return
        line_chars = JSON_CHARS_PER_CHAR * max_chars + JSON_LINE_SLACK
        for number, (line, cut) in enumerate(_pieces(f, "\n", line_chars), start=1):
            if line.strip():
                yield reader(line, cut, number)


def _parquet_documents(path: Path, max_chars: int, reader: JsonText) -> Iterator[str]:
    """A parquet file's rows as documents, reading only the columns the reader needs, a
    batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(PARQUET_BATCH_ROWS,
                                     columns=reader.columns(table.schema_arrow.names))
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield reader.record(record, f"row {number}")[:max_chars]
    except pa.ArrowException as err:  # a damaged file; ArrowInvalid is also a ValueError
        raise ValueError(first_line(err)) from None


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
    """The document of one record (a JSON line, a parquet row): its text field (--text-field,
    default "text"); for a field spec PROMPT+RESPONSE, that instruction/response pair as a
    user and an assistant turn; or, for a record without the text field, its chat
    "messages". Turns are rendered with the model's chat template (a pair without one: the
    two texts a blank line apart)."""

    def __init__(self, field: str = "text", chat_template: Callable[[list], str] | None = None):
        self.field, self.chat_template = field, chat_template
        prompt, plus, response = field.partition("+")
        self.pair = (prompt, response) if plus and prompt and response else None

    def __call__(self, line: str, cut: bool, number: int) -> str:
        if not cut:
            return self.record(json.loads(line), f"line {number}")
        # too long to parse whole: the start of its text field(s)
        if self.pair is None:
            return _text_prefix(line, number, self.field)
        prompt, response = self.pair
        return self._turns(_text_prefix(line, number, prompt),
                           _text_prefix(line, number, response, missing=""))

    def record(self, record: object, where: str) -> str:
        """The document of one record; where names it in messages ("line 3", "row 3")."""
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not a JSON object")
        if self.pair is not None:
            return self._turns(*(_string(record, name, where, self.field)
                                 for name in self.pair))
        if self.field in record:
            return _string(record, self.field, where, self.field)
        if isinstance(record.get("messages"), list):
            return self._chat(record["messages"], where)
        raise ValueError(f'{where} has no "{self.field}" field (nor chat "messages")')

    def columns(self, names: list[str]) -> list[str]:
        """The columns of a table (a parquet file's) that the documents need; a ValueError
        when it has none of them."""
        if self.pair is not None:
            missing = [name for name in self.pair if name not in names]
            if missing:
                raise ValueError(f'no "{missing[0]}" column for --text-field {self.field} '
                                 f"(columns: {', '.join(names)})")
            return list(self.pair)
        for column in (self.field, "messages"):
            if column in names:
                return [column]
        raise ValueError(f'no "{self.field}" column (nor chat "messages"); columns: '
                         f"{', '.join(names)}")

    def _turns(self, prompt: str, response: str) -> str:
        if self.chat_template is None:
            return f"{prompt}\n\n{response}"
        return self._chat([{"role": "user", "content": prompt},
                           {"role": "assistant", "content": response}], "a pair")

    def _chat(self, messages: list, where: str) -> str:
        if self.chat_template is None:
            raise ValueError(f'{where} holds chat "messages" but the model has no chat '
                             "template")
        # A table stores every key any message has: drop the empty ones (a null tool_calls)
        return self.chat_template([{k: v for k, v in m.items() if v is not None}
                                   if isinstance(m, dict) else m for m in messages])


def _string(record: dict, name: str, where: str, spec: str) -> str:
    if name not in record:
        raise ValueError(f'{where} has no "{name}" field (--text-field {spec})')
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f'{where}: "{name}" is {json.dumps(value, default=str)[:20]}, '
                         "not a string")
    return value


def _text_prefix(line: str, number: int, field: str, missing: str | None = None) -> str:
    """The start of the field's string of a JSON object cut short: the members before it
    must be whole, the string itself may be cut anywhere. A field not in the part kept gives
    missing, where that is given."""
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
