"""Checks before any weight is read: what would make the run fail an hour in, found in seconds.

`--dry-run` runs the same checks after printing the plan, so it exits 2 exactly when the real
run would stop here: no tokenizer, no calibration text, not enough disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .calibration import (
    C4_FILE,
    C4_REPO,
    JsonText,
    TextTokenizer,
    calibration_sources,
    read_documents,
)
from .errors import UserError
from .families import family_for
from .options import ConvertOptions
from .plan import Plan, build_plan
from .resources import human_bytes
from .source import Checkpoint, open_headers
from .spec import ModelSpec
from .writer import check_output_dir


def plan_from_headers(src: str, options: ConvertOptions) -> tuple[Checkpoint, Plan]:
    """SRC's plan from its config and headers alone (a Hub repo is not downloaded)."""
    ckpt = open_headers(src, options.revision)
    spec = ModelSpec.from_config(ckpt.config, family_for(ckpt.config))
    return ckpt, build_plan(ckpt, spec, options.experts, options.dtype)


def check_ready(ckpt: Checkpoint, plan: Plan, options: ConvertOptions, out: Path | None,
                overwrite: bool = False) -> None:
    """Everything the run needs besides the weights; the first missing one is a UserError."""
    tokenizer = check_tokenizer(ckpt)
    check_calibration(options.calib, options.text_field, tokenizer)
    if out is None:
        return
    if ckpt.root is not None:  # a Hub source lands in the HF cache, never inside --out
        check_output_dir(out, ckpt.root, overwrite)
    check_disk(ckpt, plan, out)


def check_tokenizer(ckpt: Checkpoint) -> TextTokenizer | None:
    """Calibration needs tokenizer.json: loaded where the checkpoint is local (and returned),
    looked up on the Hub otherwise."""
    if ckpt.root is not None:
        return TextTokenizer(ckpt.root)
    if not ckpt.files.exists("tokenizer.json"):
        raise UserError(f"{ckpt.location} has no tokenizer.json (needed for calibration text)")
    return None


# Enough of a --calib file to know it holds text, without reading a big one twice.
PREFLIGHT_CHARS = 100_000


def check_calibration(calib: str | None, field: str = "text",
                      tokenizer: TextTokenizer | None = None) -> None:
    """Every --calib source must hold text (chat lines rendered with the model's template;
    with no tokenizer at hand, a Hub source's, only their structure is checked); without
    --calib, the default C4 shard must be reachable or already in the HF cache."""
    if calib is not None:
        reader = tokenizer.json_reader(field) if tokenizer else JsonText(field, json.dumps)
        for path, _ in calibration_sources(calib):
            if path.exists() and not path.is_file() and not path.is_dir():
                continue  # a pipe (--calib <(zcat ...)) can be read once: by the run
            read_documents(path, PREFLIGHT_CHARS, reader=reader)
        return
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(C4_REPO, C4_FILE, repo_type="dataset")
    if constants.is_offline_mode() and not isinstance(cached, str):
        raise UserError(f"offline, and the default calibration text ({C4_REPO}/{C4_FILE}) is "
                        "not in the HF cache: pass --calib FILE (.jsonl, .txt or .json.gz)")


def check_disk(ckpt: Checkpoint, plan: Plan, out: Path) -> None:
    """The output must fit on --out's filesystem; the shards of a Hub source not yet in the HF
    cache must fit there too (counted together where both share a filesystem)."""
    needs = [(out, plan.bytes_out)]
    if ckpt.root is None:
        from huggingface_hub import constants

        needs.append((Path(constants.HF_HUB_CACHE), _bytes_to_download(ckpt)))
    claimed: dict[int, int] = {}  # per filesystem (st_dev): bytes needed so far
    for path, needed in needs:
        place = _existing_ancestor(path)
        device = place.stat().st_dev
        claimed[device] = claimed.get(device, 0) + needed
        free = shutil.disk_usage(place).free
        if free < claimed[device]:
            raise UserError(f"not enough disk at {place}: the run needs "
                            f"{human_bytes(claimed[device])}, {human_bytes(free)} is free")


def _bytes_to_download(ckpt: Checkpoint) -> int:
    """Bytes of the Hub source's shards that are not in the HF cache yet."""
    from huggingface_hub import try_to_load_from_cache

    shard_bytes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        shard_bytes[info.shard] = shard_bytes.get(info.shard, 0) + info.nbytes
    files = ckpt.files
    return sum(size for shard, size in shard_bytes.items()
               if not isinstance(try_to_load_from_cache(files.repo_id, shard,
                                                        revision=files.revision), str))


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above path: where its files would land."""
    place = path.absolute()
    while not place.exists():
        place = place.parent
    return place
