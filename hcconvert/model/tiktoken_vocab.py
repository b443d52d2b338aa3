"""A tiktoken vocabulary (tiktoken.model: one base64 token and its rank per line) as a
`tokenizers` Tokenizer, for checkpoints that ship no tokenizer.json (Kimi-K2's repos).

tiktoken splits text with a regular expression, then encodes each piece as one token when the
vocabulary holds it whole, else by merging, again and again, the adjacent pair whose union
ranks lowest. A byte-level BPE does the same given every split of every token into two
tokens as a merge, ordered by the rank of their union, and told to take a whole word it
holds as one token (ignore_merges): the conversion transformers' TikTokenConverter makes for
Llama-3. The special tokens follow the base vocabulary, as the checkpoint's own tokenizer
numbers them.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import UserError


@dataclass(frozen=True)
class TiktokenVocab:
    """How a family's tokenizer reads tiktoken.model: its split pattern, and how many special
    tokens follow the base vocabulary (named by tokenizer_config.json's added_tokens_decoder,
    the rest <|reserved_token_{id}|>)."""

    pattern: str
    special_tokens: int


def tiktoken_tokenizer(path: Path, vocab: TiktokenVocab,
                       named_special: dict[int, str]) -> Tokenizer:
    """The tokenizer of tiktoken.model at path; named_special: special token names by id.
    Built once per process: at Kimi-K2's 163,584 tokens it takes 2-9 s, and the preflight,
    the calibration and the evaluation each ask for it."""
    return _built(path.resolve(), vocab, tuple(sorted(named_special.items())))


@functools.lru_cache(maxsize=2)
def _built(path: Path, vocab: TiktokenVocab, named_special: tuple) -> Tokenizer:
    named = dict(named_special)
    ranks = read_ranks(path)
    chars = _byte_chars()
    spelled = {token: "".join(chars[byte] for byte in token) for token in ranks}
    tokenizer = Tokenizer(models.BPE(
        {spelled[token]: rank for token, rank in ranks.items()},
        [(spelled[left], spelled[right]) for left, right in _merges(ranks)],
        ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(vocab.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    first = len(ranks)
    specials = {i: named.get(i, f"<|reserved_token_{i}|>")
                for i in range(first, first + vocab.special_tokens)}
    tokenizer.add_special_tokens([AddedToken(name, special=True) for name in specials.values()])
    # A name given twice, or spelled like a base token, would take an existing id and move
    # every later special token down by one.
    moved = [name for i, name in specials.items() if tokenizer.token_to_id(name) != i]
    if moved:
        raise UserError(f"{path}: special token {moved[0]!r} (tokenizer_config.json) is not "
                        "numbered after the base vocabulary: a name used twice")
    return tokenizer


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model's tokens by rank; the ranks must number them 0..n-1."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path} line {number} is not a base64 token and its rank") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path} does not rank its tokens 0 to {len(ranks) - 1} once each")
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two tokens, by the rank of the token they make (then by
    the ranks of the parts)."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[left], ranks[right], left, right) for left, right in splits]
    merges.sort(key=lambda merge: merge[:3])
    return [(left, right) for *_, left, right in merges]


@functools.cache
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the character ByteLevel spells it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelled = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in spelled)
    spelled.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return spelled
