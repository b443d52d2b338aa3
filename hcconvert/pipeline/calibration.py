"""Calibration text: read documents, tokenize with the model's tokenizer, cut fixed-length samples.

--calib mixes sources by weight, each a local file or a Hub dataset (hf:ORG/NAME..., whose
split's files are fetched in order through the HF cache only as far as the documents need).

The paper calibrates on C4 (`en/c4-train.00000-of-01024.json.gz`), 32 samples of 2048 tokens,
seed 42. Documents are shuffled with the seed, tokenized one after another (each opened with
BOS where the tokenizer config asks for it) and the token stream is cut into samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, first_line, warn
from ..io.datasets import DatasetListing, dataset_listing, fetched_files
from ..io.source import Checkpoint
from ..io.text import read_documents, read_files
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
        raise UserError("--calib is empty: name a .jsonl, .json.gz, .parquet or .txt file, or "
                        "a Hub dataset as hf:ORG/NAME")
    return Path(calib)


# A --calib entry that starts so is a Hub dataset; any other is a local file, so a path is
# never taken for a dataset id (a file named so is spelt ./hf:...).
HUB_PREFIX = "hf:"
DATASET_KEYS = ("config", "split", "files", "field")
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class HubDataset:
    """A --calib entry hf:ORG/NAME[@REVISION][:config=C][:split=S][:field=F]: the split's text
    (field: --text-field's form, default --text-field's value); :files=GLOB instead of config
    and split reads the repo's files that match (the datasets library's data_files)."""

    repo_id: str
    revision: str | None = None
    config: str | None = None
    split: str = DEFAULT_SPLIT
    field: str | None = None
    files: str | None = None

    def spelt(self, revision: str | None = None) -> str:
        """The entry as --calib spells it, at revision where given."""
        revision = revision or self.revision
        keys = [f":{key}={value}" for key, value in (("config", self.config),
                ("split", None if self.split == DEFAULT_SPLIT else self.split),
                ("files", self.files), ("field", self.field)) if value is not None]
        return f"{HUB_PREFIX}{self.repo_id}{'@' + revision if revision else ''}{''.join(keys)}"

    @property
    def what(self) -> str:
        """The dataset in messages: its id, revision, and the config and split read."""
        return f"--calib {self.spelt()}"

    def listing(self) -> DatasetListing:
        return dataset_listing(self.repo_id, self.revision, self.what)

    def data_files(self, listing: DatasetListing) -> list[str]:
        """The files read, in order: the split's, or those files= matches."""
        if self.files is not None:
            return listing.matching([self.files], f"files={self.files}")
        return listing.split_files(self.config, self.split)


Source = Path | HubDataset


def calibration_sources(calib: str) -> list[tuple[Source, float]]:
    """--calib's sources and their weights: "SOURCE" or "SOURCE:W,SOURCE:W,..." (weights
    default to 1; mixed in proportion), each a file or a Hub dataset (hf:..., HubDataset)."""
    return [_hub_source(entry) if entry.strip().startswith(HUB_PREFIX) else _file_source(entry)
            for entry in (calib.split(",") if calib else [calib])]


def _file_source(entry: str) -> tuple[Path, float]:
    path, _, weight = entry.rpartition(":")
    try:
        share = _weight(weight, entry) if path else 1.0
    except ValueError:  # a colon in the path itself
        path, share = entry, 1.0
    return calibration_path((path or entry).strip()), share


def _weight(text: str, entry: str) -> float:
    """A weight; a ValueError where the text is no number."""
    share = float(text)
    if not 0 < share < math.inf:
        raise UserError(f"--calib {entry!r}: a weight must be a positive finite number")
    return share


def _hub_source(entry: str) -> tuple[HubDataset, float]:
    name, *parts = entry.strip()[len(HUB_PREFIX):].split(":")
    share = 1.0
    if parts and "=" not in parts[-1]:
        try:
            share = _weight(parts.pop(), entry)
        except ValueError:
            raise UserError(f"--calib {entry!r}: after the dataset come :KEY=VALUE "
                            f"({', '.join(DATASET_KEYS)}) and a weight") from None
    keys = dict(part.partition("=")[::2] for part in parts)
    unknown = [key for key in keys if key not in DATASET_KEYS or not keys[key]]
    if unknown or len(keys) < len(parts):
        raise UserError(f"--calib {entry!r}: {unknown[0] if unknown else 'a key given twice'}"
                        f" is no KEY=VALUE for a dataset; keys: {', '.join(DATASET_KEYS)}")
    if "files" in keys and ("config" in keys or "split" in keys):
        raise UserError(f"--calib {entry!r}: files= names the files itself; drop config= "
                        "and split=")
    repo_id, at, revision = name.partition("@")
    _check_dataset_id(repo_id, entry)
    if at and not revision:
        raise UserError(f"--calib {entry!r}: an empty revision after @")
    return HubDataset(repo_id, revision or None, keys.get("config"),
                      keys.get("split", DEFAULT_SPLIT), keys.get("field"),
                      keys.get("files")), share


def _check_dataset_id(repo_id: str, entry: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise UserError(f"--calib {entry!r}: {repo_id!r} is not a Hub dataset id "
                        f"({first_line(err)})") from None


def uses_hub(calib: str | None) -> bool:
    """Whether the calibration text comes from the Hub: the default C4 shard, or a dataset."""
    return calib is None or any(isinstance(source, HubDataset)
                                for source, _ in calibration_sources(calib))


def pinned_sources(calib: str | None) -> str | None:
    """--calib as hcconvert.json, the model card's command and a --recipe replay need it: every
    file by its absolute path (no dependence on the working directory), every Hub dataset at
    the commit its revision resolves to now (the same samples whatever the branch does)."""
    if calib is None:
        return None
    sources = calibration_sources(calib)
    spelt = [str(source.absolute()) if isinstance(source, Path)
             else source.spelt(source.listing().commit) for source, _ in sources]
    if len(sources) == 1:
        return spelt[0]
    return ",".join(f"{entry}:{weight!r}" for entry, (_, weight)
                    in zip(spelt, sources, strict=True))


def dataset_records(calib: str | None) -> list[dict]:
    """Each Hub dataset of a pinned --calib (pinned_sources) as hcconvert.json records it:
    id, commit, config, split and field."""
    if calib is None:
        return []
    return [{"dataset": source.repo_id, "commit": source.revision, "config": source.config,
             "split": source.split, "files": source.files, "field": source.field,
             "weight": weight}
            for source, weight in calibration_sources(calib) if isinstance(source, HubDataset)]


def source_names(calib: str) -> str:
    """--calib's sources in a few words: file names and dataset entries."""
    return ", ".join(f"`{source.name}`" if isinstance(source, Path) else f"`{source.spelt()}`"
                     for source, _ in calibration_sources(calib))


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
    """[N, S] calibration tokens: from --calib's sources (files, Hub datasets), each cut into
    its share of the samples (calibration_sources), or from the paper's C4 shard."""
    tokenizer = model_tokenizer(ckpt)
    if calib is None:
        return text_tokens(default_calibration_file(), tokenizer, samples, seq_len, seed,
                           field=field)
    sources = calibration_sources(calib)
    counts = sample_counts([weight for _, weight in sources], samples)
    return torch.cat([source_tokens(source, tokenizer, count, seq_len, seed, field)
                      for (source, _), count in zip(sources, counts, strict=True)])


def source_tokens(source: Source, tokenizer: TextTokenizer, samples: int, seq_len: int,
                  seed: int, field: str) -> torch.Tensor:
    """[N, S] calibration tokens of one --calib source."""
    if isinstance(source, Path):
        return text_tokens(source, tokenizer, samples, seq_len, seed, field=field)
    listing = source.listing()
    docs = read_files(fetched_files(listing, source.data_files(listing), source.what),
                      tokenizer.chars_for(samples * seq_len), source.what,
                      tokenizer.json_reader(source.field or field))
    return calibration_tokens(docs, tokenizer, samples, seq_len, seed,
                              f"calibration text {source.what}")
