"""Hub dataset repos as calibration text: which files make a config's split, fetched one by one
through huggingface_hub's cache as far as the documents need them.

A dataset's configs and splits are found the way the `datasets` library finds them: the
`configs` of its card's YAML (data_files patterns per split, data_dir), else its files' names
(data/{split}-00000-of-00001.parquet, then train/validation/test keywords in directory or file
names, else every data file is "train"). The repo's file list and card come from one API call
at a resolved commit and are kept in huggingface_hub's assets cache under that commit (a
commit's files never change), with the revision it was resolved from, so an offline run finds
the same files; the data files themselves come through hf_hub_download at that commit.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import UserError, first_line
from .hub import hub_errors
from .remote import RemoteFiles
from .text import JsonText, known_type

# The `datasets` library's split names and the keywords that mark them in file names.
SPLIT_KEYWORDS = {"train": ("train", "training"),
                  "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
NON_WORD = "[-._ 0-9]"
SHARDED = re.compile(r"data/(?P<split>\w+)-\d{5}-of-\d{5}[^/]*\.[^/]*")
# Files of a repo that are never data (the `datasets` library's list).
NOT_DATA = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json",
            "dataset_dict.json", "dummy_data.zip", ".gitattributes"}
DATA_TYPES = re.compile(r"\.(parquet|arrow|jsonl?|csv|tsv|txt)(\.(gz|zst|bz2|xz))?$")
COMMIT = re.compile(r"[0-9a-f]{40}")
# Bytes range-read from a data file to check its fields without downloading it: a JSON
# file's head (its first record), a parquet file's tail (its footer, the schema).
PROBE_BYTES = 1 << 16
PARQUET_MAGIC = b"PAR1"
# Where the listings live in huggingface_hub's assets cache (HF_ASSETS_CACHE).
ASSETS_LIBRARY = "hcconvert"
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class DatasetListing:
    """A dataset repo at one commit: its files and its card's `configs` (YAML)."""

    repo_id: str
    commit: str
    files: tuple[str, ...]
    configs: tuple[dict, ...]

    def split_files(self, config: str | None, split: str) -> list[str]:
        """The files of the config's split in the order they are read (sorted by path); a
        config or split the dataset does not have is a UserError that lists the ones it has."""
        configs = self.split_patterns()
        name = config if config is not None else self.default_config(configs)
        if name not in configs:
            raise UserError(f"dataset {self.repo_id} has no config {name!r}; its configs: "
                            f"{', '.join(configs)}")
        splits = configs[name]
        if split not in splits:
            raise UserError(f"dataset {self.repo_id} (config {name}) has no split {split!r}; "
                            f"its splits: {', '.join(splits) or 'none'}")
        return self.matching(splits[split], f"the {split} split of config {name}")

    def matching(self, patterns: list[str], what: str) -> list[str]:
        """The data files that match any of the glob patterns, sorted by path; none, or one
        hcconvert cannot read, is a UserError (what names the patterns' meaning)."""
        globs = [_glob(pattern) for pattern in patterns]
        found = sorted(path for path in self.files if not _hidden(path)
                       and PurePosixPath(path).name not in NOT_DATA
                       and any(glob.fullmatch(path) for glob in globs))
        if not found:
            raise UserError(f"dataset {self.repo_id}: no file matches {what} "
                            f"({', '.join(patterns)})")
        unreadable = [path for path in found if not known_type(path)]
        if unreadable:
            raise UserError(f"dataset {self.repo_id}: {what} holds "
                            f"{PurePosixPath(unreadable[0]).name}; hcconvert reads parquet, "
                            "JSON lines and text files")
        return found

    def split_patterns(self) -> dict[str, dict[str, list[str]]]:
        """config name -> split -> file patterns: the card's configs, else the one "default"
        config inferred from the file names."""
        configs = {}
        for entry in self.configs or ({},):
            data_dir = str(entry.get("data_dir") or "").strip("/")
            splits = (_declared_splits(entry["data_files"]) if entry.get("data_files")
                      else _inferred_splits(self._data_files(data_dir)))
            configs[str(entry.get("config_name", "default"))] = {
                split: [f"{data_dir}/{p}" if data_dir else p for p in patterns]
                for split, patterns in splits.items()}
        return configs

    def default_config(self, configs: dict[str, dict]) -> str:
        """The config used where none is named: the only one, the card's default, or one
        named "default"; else the choice is the user's."""
        marked = [str(e.get("config_name", "default")) for e in self.configs if e.get("default")]
        for candidates in (list(configs) if len(configs) == 1 else [], marked, ["default"]):
            if candidates and candidates[0] in configs:
                return candidates[0]
        raise UserError(f"dataset {self.repo_id} has several configs ({', '.join(configs)}): "
                        "name one with :config=NAME")

    def _data_files(self, under: str) -> list[str]:
        """The data files below a directory ("": all), named relative to it."""
        prefix = under + "/" if under else ""
        return [path[len(prefix):] for path in self.files if path.startswith(prefix)
                and not _hidden(path) and PurePosixPath(path).name not in NOT_DATA
                and DATA_TYPES.search(path)]


def _declared_splits(data_files) -> dict[str, list[str]]:
    """A card's data_files, in each form the `datasets` library accepts: a pattern, a list of
    patterns (both the train split), a list of {split, path} or a {split: path(s)} mapping."""
    def patterns(value) -> list[str]:
        return [value] if isinstance(value, str) else [str(v) for v in value or []]

    if isinstance(data_files, dict):
        return {str(split): patterns(value) for split, value in data_files.items()}
    if isinstance(data_files, str) or all(isinstance(d, str) for d in data_files):
        return {"train": patterns(data_files)}
    return {str(d.get("split", "train")): patterns(d.get("path")) for d in data_files
            if isinstance(d, dict)}


def _inferred_splits(files: list[str]) -> dict[str, list[str]]:
    """Splits from file names, as the `datasets` library infers them: the sharded layout
    push_to_hub writes, then train/validation/test keywords in a directory's name, then in a
    file's, else all data files form "train"."""
    sharded = sorted({m["split"] for path in files if (m := SHARDED.fullmatch(path))})
    if sharded:
        return {split: [f"data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-"
                        "[0-9][0-9][0-9][0-9][0-9]*.*"] for split in sharded}
    for forms in (("**/{k}/**", "**/{k}[{s}]*/**", "**/*[{s}]{k}/**", "**/*[{s}]{k}[{s}]*/**"),
                  ("**/{k}[{s}]*", "**/*[{s}]{k}[{s}]*")):
        splits = {split: [form.format(k=k, s=NON_WORD[1:-1]) for k in keywords
                          for form in forms]
                  for split, keywords in SPLIT_KEYWORDS.items()}
        found = {split: patterns for split, patterns in splits.items()
                 if any(glob.fullmatch(path) for glob in map(_glob, patterns)
                        for path in files)}
        if found:
            return found
    return {"train": ["**"]} if files else {}


def _glob(pattern: str) -> re.Pattern:
    """A glob pattern as Python's glob (and fsspec's) reads it: * and ? stay inside one path
    segment, a ** segment spans any number of them."""
    parts = pattern.strip("/").split("/")
    regex = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
            continue
        regex += re.sub(r"\\\*(\\\*)?|\\\?|\\\[(!)?(.*?)\\\]", _glob_piece, re.escape(part))
        regex += "" if last else "/"
    return re.compile(regex)


def _glob_piece(match: re.Match) -> str:
    token = match.group(0)
    if token.startswith("\\*"):
        return "[^/]*"
    if token == "\\?":
        return "[^/]"
    body = match.group(3).replace("\\", "")
    return "[" + ("^" if match.group(2) else "") + re.sub(r"([\]\\^])", r"\\\1", body) + "]"


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "__")) for part in PurePosixPath(path).parts)


def dataset_listing(repo_id: str, revision: str | None, what: str) -> DatasetListing:
    """The dataset repo at revision (default main): from the Hub, or offline from the assets
    cache where an earlier run resolved it. what names the dataset in messages."""
    from huggingface_hub import constants

    revision = revision or DEFAULT_REVISION
    if not constants.is_offline_mode():
        return _fetch_listing(repo_id, revision, what)
    commit = revision if COMMIT.fullmatch(revision) else _cached_refs(repo_id).get(revision)
    listing = _cached_listing(repo_id, commit) if commit else None
    if listing is None:
        raise UserError(f"{what}: offline (HF_HUB_OFFLINE is set, or the Hub is unreachable) "
                        "and the dataset is not in the HF cache")
    return listing


def _fetch_listing(repo_id: str, revision: str, what: str) -> DatasetListing:
    from huggingface_hub import HfApi

    with hub_errors(what):
        info = HfApi().dataset_info(repo_id, revision=revision)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    configs = card.get("configs") if isinstance(card.get("configs"), list) else []
    listing = DatasetListing(repo_id, info.sha, tuple(s.rfilename for s in info.siblings or []),
                             tuple(c for c in configs if isinstance(c, dict)))
    _store(repo_id, f"{listing.commit}.json",
           {"files": listing.files, "configs": listing.configs})
    _store(repo_id, "refs.json", {**_cached_refs(repo_id), revision: listing.commit})
    return listing


def _cached_listing(repo_id: str, commit: str) -> DatasetListing | None:
    found = _load(repo_id, f"{commit}.json")
    if not isinstance(found, dict):
        return None
    return DatasetListing(repo_id, commit, tuple(found.get("files", [])),
                          tuple(found.get("configs", [])))


def _cached_refs(repo_id: str) -> dict[str, str]:
    refs = _load(repo_id, "refs.json")
    return refs if isinstance(refs, dict) else {}


def _assets(repo_id: str) -> Path:
    """The repo's folder in huggingface_hub's assets cache (HF_ASSETS_CACHE, read now)."""
    from huggingface_hub import cached_assets_path, constants

    return cached_assets_path(ASSETS_LIBRARY, "datasets--" + repo_id.replace("/", "--"),
                              "listings", assets_dir=constants.HF_ASSETS_CACHE)


def _load(repo_id: str, name: str):
    try:
        return json.loads((_assets(repo_id) / name).read_text())
    except (OSError, ValueError):  # not cached, or damaged: as if not cached
        return None


def _store(repo_id: str, name: str, value) -> None:
    """Write atomically: two runs may resolve the same dataset at once."""
    path = _assets(repo_id) / name
    partial = path.with_name(f".{name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def fetched_files(listing: DatasetListing, files: list[str], what: str
                  ) -> Iterator[tuple[str, Path]]:
    """(name in messages, local path) of each file, downloaded at the listing's commit into
    the HF cache (or found there offline) only when the iteration reaches it."""
    from huggingface_hub import hf_hub_download

    for name in files:
        with hub_errors(f"{what}: cannot fetch {name}"):
            path = hf_hub_download(listing.repo_id, name, repo_type="dataset",
                                   revision=listing.commit)
        yield f"{what} file {name}", Path(path)


def cached_file(listing: DatasetListing, name: str) -> Path | None:
    """The file's copy in the HF cache, if there is one."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(listing.repo_id, name, revision=listing.commit,
                                   repo_type="dataset")
    return Path(found) if isinstance(found, str) else None


def check_head(listing: DatasetListing, name: str, reader: JsonText, what: str) -> None:
    """The fields the reader needs, checked in a data file by range reads, downloading no
    data: a parquet file's columns (its footer), a JSON file's first record (a text file has
    no fields)."""
    files = RemoteFiles(listing.repo_id, listing.commit, repo_type="dataset")
    label = f"{what} file {name}"
    with hub_errors(label):
        try:
            if name.lower().endswith(".parquet"):
                reader.columns(_parquet_columns(files, name))
            elif ".json" in name.lower():
                reader(*_first_line(files, name), 1)
        except (ValueError, EOFError, zlib.error) as err:
            raise UserError(f"cannot read {label}: {first_line(err)}") from None


def _parquet_columns(files: RemoteFiles, name: str) -> list[str]:
    """A parquet file's column names, from its footer: the file's last bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, size = _range(files, name, 0, len(PARQUET_MAGIC))
    if size is None:
        raise ValueError("the Hub did not say the file's size")
    tail, _ = _range(files, name, max(size - PROBE_BYTES, 0), min(size, PROBE_BYTES))
    footer = int.from_bytes(tail[-8:-4], "little") + 8  # the footer, its length, the magic
    if tail[-4:] != PARQUET_MAGIC or footer + len(PARQUET_MAGIC) > size:
        raise ValueError("not a parquet file")
    if footer > len(tail):
        tail, _ = _range(files, name, size - footer, footer)
    try:  # the footer after a magic number reads as a file with no rows
        schema = pq.read_schema(pa.BufferReader(PARQUET_MAGIC + tail[-footer:]))
    except pa.ArrowException as err:
        raise ValueError(first_line(err)) from None
    return schema.names


def _first_line(files: RemoteFiles, name: str) -> tuple[str, bool]:
    """A JSON lines file's first non-blank line from its first bytes (decompressed where it is
    gzipped), and whether it was cut there."""
    data, size = _range(files, name, 0, PROBE_BYTES)
    whole = size is not None and len(data) >= size
    if name.lower().endswith(".gz"):
        data = zlib.decompressobj(wbits=31).decompress(data)
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=whole)
    *lines, last = text.split("\n")
    complete = [line for line in lines if line.strip()]
    return (complete[0], False) if complete else (last, not whole)


def _range(files: RemoteFiles, name: str, start: int, length: int) -> tuple[bytes, int | None]:
    found = files.read_range(name, start, length)
    if found is None:
        raise ValueError("the repo has no such file")
    return found
