"""Checks before any weight is read: what would make the run fail an hour in, found in seconds.

`--dry-run` runs the same checks after printing the plan, so it exits 2 exactly when the real
run would stop here: no tokenizer, no calibration text, not enough disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..io.datasets import cached_file, check_head
from ..io.source import Checkpoint, open_headers
from ..io.staging import check_output_dir
from ..io.text import JsonText, read_documents, read_files
from ..model.families import family_for
from ..model.spec import ModelSpec
from ..model.tokenizer import TextTokenizer, model_tokenizer, no_tokenizer
from ..resources import human_bytes
from .calibration import C4_FILE, C4_REPO, HubDataset, calibration_sources, load_calibration
from .checks import plan_for
from .options import ConvertOptions
from .plan import Plan


def plan_from_headers(src: str,
                      options: ConvertOptions) -> tuple[Checkpoint, ConvertOptions, Plan]:
    """SRC's plan from its config and headers alone (a Hub repo is not downloaded), with the
    options checked against the model and completed by it (checks.for_model)."""
    ckpt = open_headers(src, options.revision)
    spec = ModelSpec.from_config(ckpt.config, family_for(ckpt.config))
    return (ckpt, *plan_for(ckpt, spec, options))


def check_ready(ckpt: Checkpoint, options: ConvertOptions, plan: Plan, out: Path | None,
                overwrite: bool = False, low_disk: bool = False) -> None:
    """Everything the run needs besides the weights; the first missing one is a UserError."""
    check_text(ckpt, options)
    check_output(ckpt, plan, out, overwrite, low_disk)


def check_text(ckpt: Checkpoint, options: ConvertOptions) -> int | None:
    """The tokenizer and the calibration text; returns the samples the text gives, where the
    tokenizer and the text are at hand (a local checkpoint and --calib files), else None."""
    return check_calibration(ckpt, options, check_tokenizer(ckpt))


def check_output(ckpt: Checkpoint, plan: Plan, out: Path | None, overwrite: bool = False,
                 low_disk: bool = False) -> None:
    """--out (if given) and the disk the output and a Hub source's download need."""
    if out is None:
        return
    if ckpt.root is not None:  # a Hub source lands in the HF cache, never inside --out
        check_output_dir(out, ckpt.root, overwrite)
    check_disk(ckpt, plan, out, low_disk)


def check_tokenizer(ckpt: Checkpoint) -> TextTokenizer | None:
    """Calibration needs tokenizer.json: loaded where the checkpoint is local (and returned),
    looked up on the Hub otherwise."""
    if ckpt.root is not None:
        return model_tokenizer(ckpt, check_rows=False)
    if not ckpt.files.exists("tokenizer.json"):
        tiktoken = ckpt.files.exists("tiktoken.model")
        if not (tiktoken and family_for(ckpt.config).tiktoken is not None):
            raise no_tokenizer(ckpt.location, tiktoken)
    return None


# Enough of a --calib file to know it holds text, where it cannot be tokenized yet (a Hub
# source's tokenizer is not downloaded by the preflight).
PREFLIGHT_CHARS = 100_000


def check_calibration(ckpt: Checkpoint, options: ConvertOptions,
                      tokenizer: TextTokenizer | None) -> int | None:
    """Every --calib source must hold text: with the tokenizer at hand and only local files,
    cut into samples as the run cuts them (the samples are returned); otherwise each file's
    structure is checked, and each Hub dataset's config, split and fields from its metadata
    (check_dataset). Without --calib, the default C4 shard must be reachable or already in
    the HF cache."""
    if options.calib is None:
        _check_default_text()
        return None
    sources = calibration_sources(options.calib)
    # A pipe (--calib <(zcat ...)) can be read once: by the run.
    readable = [source for source, _ in sources
                if isinstance(source, HubDataset) or source.is_file() or not source.exists()]
    if tokenizer is not None and all(isinstance(source, Path) for source in readable) \
            and len(readable) == len(sources):
        return len(load_calibration(ckpt, options.calib, options.calib_samples,
                                    options.seq_len, options.seed, options.text_field))

    def reader(field: str) -> JsonText:
        return tokenizer.json_reader(field) if tokenizer else JsonText(field, json.dumps)

    for source in readable:
        if isinstance(source, HubDataset):
            check_dataset(source, reader(source.field or options.text_field))
        else:
            read_documents(source, PREFLIGHT_CHARS, reader=reader(options.text_field))
    return None


def check_dataset(source: HubDataset, reader: JsonText) -> None:
    """A Hub dataset the run can read, downloading no data: the dataset and revision exist,
    the config and split (its files from the repo listing), and the fields the reader needs
    in the split's first file (from its cached copy, else by range reads; offline it must
    be cached)."""
    from huggingface_hub import constants

    listing = source.listing()
    first = source.data_files(listing)[0]
    cached = cached_file(listing, first)
    if cached is not None:
        read_files([(f"{source.what} file {first}", cached)], PREFLIGHT_CHARS, source.what,
                   reader)
    elif constants.is_offline_mode():
        raise UserError(f"{source.what}: offline (HF_HUB_OFFLINE is set, or the Hub is "
                        f"unreachable) and {first} is not in the HF cache")
    else:
        check_head(listing, first, reader, source.what)


def _check_default_text() -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(C4_REPO, C4_FILE, repo_type="dataset")
    if constants.is_offline_mode() and not isinstance(cached, str):
        raise UserError(f"offline, and the default calibration text ({C4_REPO}/{C4_FILE}) is "
                        "not in the HF cache: pass --calib FILE (.jsonl, .txt or .json.gz)")


def check_disk(ckpt: Checkpoint, plan: Plan, out: Path, low_disk: bool = False) -> None:
    """The output must fit on --out's filesystem; the shards of a Hub source not yet in the HF
    cache must fit there too (counted together where both share a filesystem), or with
    --low-disk the most of them the cache holds at once."""
    needs = [(out, plan.bytes_out)]
    if ckpt.root is None:
        from huggingface_hub import constants

        needs.append((Path(constants.HF_HUB_CACHE), download_bytes(ckpt, plan, low_disk)))
    claimed: dict[int, int] = {}  # per filesystem (st_dev): bytes needed so far
    for path, needed in needs:
        place = _existing_ancestor(path)
        device = place.stat().st_dev
        claimed[device] = claimed.get(device, 0) + needed
        free = shutil.disk_usage(place).free
        if free < claimed[device]:
            raise UserError(f"not enough disk at {place}: the run needs "
                            f"{human_bytes(claimed[device])}, {human_bytes(free)} is free")


def download_bytes(ckpt: Checkpoint, plan: Plan, low_disk: bool) -> int:
    """The HF cache space a Hub source's run needs: the shards not cached yet, or with
    --low-disk the most of them held at once."""
    missing = _shards_to_download(ckpt)
    if not low_disk:
        return sum(missing.values())
    return low_disk_peak(ckpt, [plan.global_names, *plan.layer_names], missing)


def low_disk_peak(ckpt: Checkpoint, reads: list[list[str]], downloaded: dict[str, int]) -> int:
    """The most bytes of the downloaded shards (name -> bytes) the HF cache holds at once with
    --low-disk, when the run reads these groups of tensors in order (the globals, then layer
    by layer): a shard comes with the first read of a tensor in it and goes once all of its
    tensors are read. An upper bound: the run fetches a group's shards one by one."""
    unread: dict[str, set[str]] = {}
    for name, info in ckpt.tensors.items():
        unread.setdefault(info.shard, set()).add(name)
    present: set[str] = set()
    peak = 0
    for names in reads:
        present.update(ckpt.tensors[name].shard for name in names)
        peak = max(peak, sum(downloaded.get(shard, 0) for shard in present))
        for name in names:
            unread[ckpt.tensors[name].shard].discard(name)
        present = {shard for shard in present if unread[shard]}
    return peak


def _shards_to_download(ckpt: Checkpoint) -> dict[str, int]:
    """The Hub source's shards that are not in the HF cache yet, and their bytes (the file's,
    header included, where the server said; else its tensors')."""
    from huggingface_hub import try_to_load_from_cache

    files = ckpt.files
    shard_bytes = dict(files.sizes)
    for info in ckpt.tensors.values():
        if info.shard not in files.sizes:
            shard_bytes[info.shard] = shard_bytes.get(info.shard, 0) + info.nbytes
    return {shard: size for shard, size in shard_bytes.items()
            if not isinstance(try_to_load_from_cache(files.repo_id, shard,
                                                     revision=files.revision), str)}


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above path: where its files would land."""
    place = path.absolute()
    while not place.exists():
        place = place.parent
    return place
