"""Hostile input, concurrency and signals: each bad input ends with exit code 2 and one line on
stderr, no traceback, nothing at --out or beside it, SRC byte for byte as it was."""

import fcntl
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_mixtral, tree_digest
from cli_runs import CLI, assert_one_error_line, convert_args
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hcconvert.cli.demo import data_file
from hcconvert.cli.main import main
from hcconvert.errors import UserError
from hcconvert.io.staging import remove_tree, staged_outputs
from hcconvert.signals import Interrupted, signals_as_interrupts

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One tiny checkpoint per module; each test works on its own copy."""
    return save_tiny_mixtral(tmp_path_factory.mktemp("pristine") / "src")


@pytest.fixture
def src(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "src"))


@pytest.fixture
def calib(tmp_path, calib_text) -> Path:
    return Path(shutil.copy(calib_text, tmp_path / "calib.txt"))


def assert_refused(workspace: Path, src: Path, args: list, fragment: str) -> None:
    """Run the CLI in-process: exit 2, one line naming the fault, the workspace (where --out
    and everything beside it live) and SRC exactly as before."""
    entries, before = sorted(os.listdir(workspace)), tree_digest(src)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_one_error_line(result.exit_code, result.stderr, fragment)
    assert sorted(os.listdir(workspace)) == entries
    assert tree_digest(src) == before


# --- calibration text -------------------------------------------------------------------------

def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write_text(name: str, content: str | bytes):
    def write(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return write


def gzipped(name: str, content: bytes, keep: slice = slice(None)):
    return write_text(name, gzip.compress(content)[keep])


DEEP = "[" * 100_000 + "]" * 100_000
LONG = "word " * 20_000  # longer than any JSON line the reader keeps for 2 x 32 tokens

BAD_CALIBRATION = {
    # name -> (writes the --calib file into a directory and returns it, error fragment)
    "null text": (write_text("c.jsonl", jsonl({"text": None})), '"text" is null'),
    "number text": (write_text("c.jsonl", jsonl({"text": 7})), '"text" is 7'),
    "list text": (write_text("c.jsonl", jsonl({"text": ["a"]})), "not a string"),
    "text after a good line is null": (
        write_text("c.jsonl", jsonl({"text": "fine"}, {"text": None})), "line 2"),
    "line is a list": (write_text("c.jsonl", jsonl([1, 2])), "line 1 is not a JSON object"),
    "no text field": (write_text("c.jsonl", jsonl({"body": "x"})), '"text" field'),
    "not json": (write_text("c.jsonl", "{not json\n"), "cannot read calibration file"),
    "deeply nested line": (write_text("c.jsonl", DEEP + "\n"), "cannot read calibration file"),
    "huge line, null text": (
        write_text("c.jsonl", jsonl('{"pad": "' + LONG + '", "text": null}')), "text"),
    "huge line, text not a string": (
        write_text("c.jsonl", jsonl('{"text": 5, "pad": "' + LONG + '"}')), "not a string"),
    "huge line, no object": (write_text("c.jsonl", jsonl(json.dumps([LONG]))),
                             "not a JSON object"),
    "truncated gzip": (gzipped("c.json.gz", jsonl({"text": LONG}).encode(), slice(0, 200)),
                       "cannot read calibration file"),
    "corrupt gzip": (write_text("c.json.gz", b"\x1f\x8b\x08\x00garbage" * 50),
                     "cannot read calibration file"),
    "not gzip at all": (write_text("c.json.gz", b"plain text, no gzip"),
                        "cannot read calibration file"),
    "gzip of invalid utf-8": (gzipped("c.txt.gz", b"\xff\xfe\xfa" * 100),
                              "cannot read calibration file"),
    "invalid utf-8": (write_text("c.txt", b"ok \xff\xfe bad"), "cannot read calibration file"),
    "only blank lines": (write_text("c.txt", "\n\n \n\t\n"), "no text"),
    "only empty texts": (write_text("c.jsonl", jsonl({"text": ""}, {"text": "  "})), "no text"),
    "lone surrogate": (write_text("c.jsonl", '{"text": "\\ud800 x"}\n'), "tokenized"),
    "empty --calib": (lambda directory: "", "--calib is empty"),
    "directory as --calib": (lambda directory: directory, "is a directory"),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATION))
def test_bad_calibration_text(tmp_path, src, case):
    write, fragment = BAD_CALIBRATION[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    calib = write(inputs)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib), fragment)


# --- config.json ------------------------------------------------------------------------------

def set_config(**changes):
    def change(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))
    return change


def replace_config(text: str):
    return lambda src: (src / "config.json").write_text(text)


BAD_CONFIGS = {
    "experts 1e9": (set_config(num_local_experts=10**9), "num_local_experts is 1000000000"),
    "layers 1e9": (set_config(num_hidden_layers=10**9), "num_hidden_layers is 1000000000"),
    "experts as float 1e9": (set_config(num_local_experts=1e9), "num_local_experts"),
    "hidden size 1e12": (set_config(hidden_size=10**12), "hidden_size"),
    "experts as string": (set_config(num_local_experts="8"), "num_local_experts is '8'"),
    "layers as float": (set_config(num_hidden_layers=2.0), "num_hidden_layers is 2.0"),
    "top-k as boolean": (set_config(num_experts_per_tok=True), "num_experts_per_tok"),
    "zero heads": (set_config(num_attention_heads=0), "num_attention_heads is 0"),
    "negative width": (set_config(hidden_size=-32), "hidden_size is -32"),
    "kv heads not dividing heads": (set_config(num_key_value_heads=3), "not a multiple"),
    "model_type a list": (set_config(model_type=["mixtral"]), "model_type is array"),
    "flag as string": (set_config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "eps as string": (set_config(rms_norm_eps="small"), "rms_norm_eps"),
    "rope parameters a list": (set_config(rope_parameters=[1]), "rope_parameters is array"),
    "rope theta as string": (set_config(rope_parameters={"rope_theta": "big"}),
                             "rope_parameters.rope_theta"),
    "config a list": (replace_config("[1, 2]"), "holds a JSON array"),
    "config a number": (replace_config("42"), "holds a JSON number"),
    "deeply nested": (replace_config('{"x": ' + DEEP + "}"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_value(tmp_path, src, calib, case):
    damage, fragment = BAD_CONFIGS[case]
    damage(src)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib), fragment)


@pytest.mark.parametrize("command", ["inspect", "dry-run"])
@pytest.mark.parametrize("key", ["num_local_experts", "num_hidden_layers"])
def test_absurd_size_refused_without_building(tmp_path, src, command, key):
    set_config(**{key: 10**9})(src)
    args = ["inspect", src] if command == "inspect" else [src, "--experts", 3, "--dry-run"]
    started = time.monotonic()
    assert_refused(tmp_path, src, args, key)
    assert time.monotonic() - started < 10  # refused from the config, not after building


# --- shard headers ----------------------------------------------------------------------------

def first_shard(src: Path) -> Path:
    """The first shard holding more than one tensor."""
    return next(shard for shard in sorted(src.glob("model-*.safetensors"))
                if len(split_shard(shard)[0]) > 2)


def split_shard(shard: Path) -> tuple[dict, bytes]:
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_shard(shard: Path, header: bytes, body: bytes) -> None:
    header += b" " * (-len(header) % 8)
    shard.write_bytes(struct.pack("<Q", len(header)) + header + body)


def edit_entry(change):
    """Apply change(header, name of the first tensor, name of a later one) to the first shard."""
    def damage(src: Path) -> None:
        shard = first_shard(src)
        header, body = split_shard(shard)
        names = sorted((n for n in header if n != "__metadata__"),
                       key=lambda n: header[n]["data_offsets"])
        change(header, names[0], names[1])
        write_shard(shard, json.dumps(header).encode(), body)
    return damage


def raw_header(header: bytes):
    def damage(src: Path) -> None:
        write_shard(first_shard(src), header, split_shard(first_shard(src))[1])
    return damage


def set_field(field, value):
    return edit_entry(lambda h, first, later: h[first].__setitem__(field, value))


def shift_back(h, first, later):
    begin, end = h[later]["data_offsets"]
    h[later]["data_offsets"] = [begin - 4, end - 4]


def double_first_dim(h, first, later):
    h[first]["shape"] = [2 * h[first]["shape"][0], *h[first]["shape"][1:]]


def absurd_length(src: Path) -> None:
    shard = first_shard(src)
    shard.write_bytes(struct.pack("<Q", 2**62) + shard.read_bytes()[8:])


BAD_HEADERS = {
    "entry a number": (edit_entry(lambda h, first, later: h.__setitem__(first, 5)),
                       "not a JSON object"),
    "entry a list": (edit_entry(lambda h, first, later: h.__setitem__(first, [1, 2])),
                     "not a JSON object"),
    "offsets missing": (edit_entry(lambda h, first, later: h[first].pop("data_offsets")),
                        "data_offsets None"),
    "offsets one number": (set_field("data_offsets", [0]), "data_offsets [0]"),
    "offsets reversed": (set_field("data_offsets", [8, 0]), "data_offsets [8, 0]"),
    "offsets overlap": (edit_entry(shift_back), "overlaps"),
    "shape bytes differ from offsets": (edit_entry(double_first_dim), "its offsets hold"),
    "negative dimension": (set_field("shape", [-1, 32]), "non-negative integers"),
    "float dimension": (set_field("shape", [2.5, 32]), "non-negative integers"),
    "boolean dimension": (set_field("shape", [True]), "non-negative integers"),
    "shape a string": (set_field("shape", "32x32"), "non-negative integers"),
    "unknown dtype": (set_field("dtype", "F4"), "dtype 'F4'"),
    "dtype a number": (set_field("dtype", 4), "dtype 4"),
    "metadata a string": (edit_entry(lambda h, first, later: h.__setitem__("__metadata__", "x")),
                          "__metadata__"),
    "header a list": (raw_header(b"[1, 2]"), "not a JSON object"),
    "header not json": (raw_header(b"{not json"), "unreadable"),
    "header deeply nested": (raw_header(b'{"__metadata__": ' + DEEP.encode() + b"}"),
                             "unreadable"),
    "header length absurd": (absurd_length, "unreadable"),
    "bytes after the last tensor": (lambda s: first_shard(s).open("ab").write(b"\0" * 16),
                                    "longer than its header says"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_shard_header(tmp_path, src, calib, case):
    damage, fragment = BAD_HEADERS[case]
    damage(src)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib), fragment)


# --- the shard index ---------------------------------------------------------------------------

def point_index(shard: str):
    """The index names the first tensor's shard as `shard` (a copy of the shard placed there
    where it is a path the test can make), as a hostile checkpoint might."""
    def damage(src: Path) -> None:
        index = json.loads((src / INDEX).read_text())
        name = next(iter(index["weight_map"]))
        target = (src / shard) if not shard.startswith("/") else Path(shard)
        if not str(shard).startswith("/etc"):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / index["weight_map"][name], target)
        index["weight_map"][name] = shard
        (src / INDEX).write_text(json.dumps(index))
    return damage


def retype_index(change):
    def damage(src: Path) -> None:
        index = json.loads((src / INDEX).read_text())
        change(index["weight_map"])
        (src / INDEX).write_text(json.dumps(index))
    return damage


BAD_INDEXES = {
    "shard above the checkpoint": (point_index("../outside/x.safetensors"), "not a file inside"),
    "shard by an absolute path": (point_index("/etc/hostname"), "not a file inside"),
    "shard a number": (retype_index(lambda m: m.__setitem__(next(iter(m)), 7)),
                       "maps to a JSON number"),
    "shard a list": (retype_index(lambda m: m.__setitem__(next(iter(m)), ["a"])),
                     "maps to a JSON array"),
    "weight map a list": (lambda s: (s / INDEX).write_text('{"weight_map": []}'),
                          "weight_map is not a map"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
@pytest.mark.parametrize("command", ["convert", "dry-run", "inspect"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, src, calib, case,
                                                                command):
    damage, fragment = BAD_INDEXES[case]
    damage(src)
    args = {"convert": convert_args(src, tmp_path / "out", calib),
            "dry-run": [src, "--experts", 3, "--dry-run"], "inspect": ["inspect", src]}[command]
    assert_refused(tmp_path, src, args, fragment)


def test_a_folder_leading_out_of_the_checkpoint_is_refused(tmp_path, src, calib):
    """A subfolder that is a symbolic link to a directory outside: lexically inside, really
    outside."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (src / "sub").symlink_to(outside)
    point_index("sub/x.safetensors")(src)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib), "lies outside")


def test_shards_in_a_subfolder_and_as_cache_links_convert(tmp_path, src, calib):
    """Shards in a subfolder, and shards that are symbolic links into blobs beside the
    checkpoint, as the HF cache lays a snapshot out, still convert."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    index = json.loads((src / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        moved = src / "parts" / shard
        moved.parent.mkdir(exist_ok=True)
        (blobs / shard).write_bytes((src / shard).read_bytes())
        (src / shard).unlink()
        moved.symlink_to(blobs / shard)
    index["weight_map"] = {k: f"parts/{v}" for k, v in index["weight_map"].items()}
    (src / INDEX).write_text(json.dumps(index))
    result = CliRunner().invoke(main, [str(a) for a in convert_args(src, tmp_path / "out",
                                                                      calib)])
    assert result.exit_code == 0, result.output


# --- weights ----------------------------------------------------------------------------------

def poison(name: str, value: float):
    """Set one element of tensor `name` to value, rewriting its shard."""
    def damage(src: Path) -> None:
        shard = src / json.loads((src / INDEX).read_text())["weight_map"][name]
        tensors = load_file(shard)
        tensors[name].view(-1)[3] = value
        save_file(tensors, shard, metadata={"format": "pt"})
    return damage


BAD_WEIGHTS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.block_sparse_moe.experts.5.w2.weight"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", BAD_WEIGHTS)
def test_non_finite_weight_named(tmp_path, src, calib, name, value):
    poison(name, value)(src)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib),
                   f"tensor {name} holds NaN or infinite values")


# --- tokenizer and vocabulary -----------------------------------------------------------------

def shrink_vocabulary(src: Path, rows: int) -> None:
    """A self-consistent checkpoint whose embedding and LM head keep only `rows` tokens."""
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shard = src / weight_map[name]
        tensors = load_file(shard)
        tensors[name] = tensors[name][:rows].clone()
        save_file(tensors, shard, metadata={"format": "pt"})
    set_config(vocab_size=rows)(src)


def rename_experts(src: Path) -> None:
    """Expert tensors under names of a layout hcconvert does not read."""
    def renamed(name: str) -> str:
        return name.replace(".experts.", ".expert_list.")

    for shard in src.glob("model-*.safetensors"):
        tensors = load_file(shard)
        save_file({renamed(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {renamed(k): v for k, v in index["weight_map"].items()}
    (src / INDEX).write_text(json.dumps(index))


def without_bos(src: Path) -> None:
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    (src / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("tiktoken", [False, True])
def test_missing_tokenizer_is_named(tmp_path, src, calib, tiktoken):
    """Calibration needs tokenizer.json; where tiktoken.model stands in for it (Kimi-K2's
    repos), the refusal says so."""
    (src / "tokenizer.json").unlink()
    if tiktoken:
        (src / "tiktoken.model").write_text("IQ== 0\n")
    fragment = "has no tokenizer.json (needed for calibration text)" + (
        ": it ships tiktoken.model" if tiktoken else "")
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib), fragment)


def test_token_ids_beyond_embedding(tmp_path, src, calib):
    shrink_vocabulary(src, 40)
    assert_refused(tmp_path, src, convert_args(src, tmp_path / "out", calib),
                   "beyond the model's embedding table of 40 rows")


@pytest.fixture
def other(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "other"))


BAD_EVALS = {
    # damage to the second model, extra options -> fragment
    "different vocabularies": (lambda s: shrink_vocabulary(s, 200), [],
                               "different vocabularies"),
    "unknown expert layout": (rename_experts, [], "is not part of a mixtral layer"),
    "one-token sequences": (lambda s: None, ["--seq-len", 1], "1 token"),
    "missing model": (lambda s: shutil.rmtree(s), [], "no such directory"),
}


@pytest.mark.parametrize("case", list(BAD_EVALS))
def test_bad_eval(tmp_path, src, other, calib, case):
    damage, extra, fragment = BAD_EVALS[case]
    damage(other)
    assert_refused(tmp_path, src, ["eval", src, other, "--text", calib, "--samples", 2, *extra],
                   fragment)


def test_eval_of_one_token_text(tmp_path, src, calib):
    without_bos(src)
    text = tmp_path / "one.txt"
    text.write_text("a")
    assert_refused(tmp_path, src, ["eval", src, src, "--text", text], "1 token")


# --- output paths -----------------------------------------------------------------------------

def symlink_to(target: str, content: bool = False):
    """--out as a symbolic link to target (created beside it unless it is src)."""
    def make(workspace: Path) -> Path:
        if target != "src":
            (workspace / target).mkdir()
            if content:
                (workspace / target / "keep.txt").write_text("mine")
        (workspace / "out").symlink_to(workspace / target)
        return workspace / "out"
    return make


def dangling(workspace: Path) -> Path:
    (workspace / "out").symlink_to(workspace / "nowhere")
    return workspace / "out"


def named(length: int):
    return lambda workspace: workspace / ("n" * length)


def existing_file(workspace: Path) -> Path:
    (workspace / "out").write_text("a file")
    return workspace / "out"


def below_a_file(workspace: Path) -> Path:
    (workspace / "file").write_text("a file")
    return workspace / "file" / "deeper" / "out"



BAD_OUTPUTS = {
    # makes --out in the workspace, extra options -> fragment
    "symlink to an empty directory": (symlink_to("target"), [], "symbolic link"),
    "symlink, --overwrite": (symlink_to("target", content=True), ["--overwrite"],
                             "symbolic link"),
    "dangling symlink": (dangling, [], "symbolic link"),
    "symlink to SRC, --overwrite": (symlink_to("src"), ["--overwrite"], "symbolic link"),
    "name one byte too long for the lock": (named(240), [], "too long"),
    "name beyond the limit": (named(300), [], "too long"),
    "an existing file": (existing_file, ["--overwrite"], "not a directory"),
    "below a file": (below_a_file, [], "file is not a directory"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_output_path(tmp_path, src, calib, case):
    make, extra, fragment = BAD_OUTPUTS[case]
    out = make(tmp_path)
    target = tmp_path / "target"
    before = tree_digest(target) if target.exists() else None
    assert_refused(tmp_path, src, convert_args(src, out, calib, *extra), fragment)
    assert (tree_digest(target) if target.exists() else None) == before
    dry = CliRunner().invoke(main, [str(a) for a in convert_args(src, out, calib, *extra,
                                                                 "--dry-run")])
    assert_one_error_line(dry.exit_code, dry.stderr, fragment)  # --dry-run finds it too


def test_output_beside_an_unwritable_directory_is_refused_by_dry_run_too(tmp_path, src, calib,
                                                                        monkeypatch):
    """A read-only file system (which even root cannot write) is refused before any work."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode: Path(path) != locked and access(path, mode))
    for extra in ([], ["--dry-run"]):
        assert_refused(tmp_path, src, convert_args(src, locked / "out", calib, *extra),
                       "locked is not writable")


def test_parents_created_by_a_failed_run_are_removed(tmp_path, src):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl({"text": None}))
    out = tmp_path / "new" / "deeper" / "out"
    assert_refused(tmp_path, src, convert_args(src, out, bad), '"text" is null')


def test_name_just_within_the_limit_converts(tmp_path, src, calib):
    out = tmp_path / ("n" * 231)  # ".NAME.hcconvert-tmp-" plus 8 random characters: 255 bytes
    result = CliRunner().invoke(main, [str(a) for a in convert_args(src, out, calib)])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["src", "calib.txt", out.name])


@pytest.mark.parametrize("name", [".out.hcconvert-tmp", ".out.hcconvert-old"])
def test_source_at_a_former_scratch_name_survives_overwrite(tmp_path, pristine, calib, name):
    """Defect: SRC at the path hcconvert used for staging or the old output was deleted."""
    src = Path(shutil.copytree(pristine, tmp_path / name))
    before = tree_digest(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    result = CliRunner().invoke(main, [str(a) for a in convert_args(src, out, calib,
                                                                     "--overwrite")])
    assert result.exit_code == 0, result.stderr
    assert tree_digest(src) == before
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == sorted([name, "calib.txt", "out"])


@pytest.mark.parametrize("where", ["itself", "inside", "holding"])
def test_remove_tree_never_touches_source(tmp_path, src, where):
    target = {"itself": src, "inside": src / "sub", "holding": tmp_path}[where]
    (src / "sub").mkdir()
    before = tree_digest(src)
    with pytest.raises(UserError, match="source directory"):
        remove_tree(target, src.resolve())
    assert tree_digest(src) == before and (src / "sub").is_dir()


# --- Hub --------------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")


@pytest.mark.parametrize("source,fragment", [
    ("someone/some-moe", "cannot download"),
    ("some one/bad id!", "cannot download"),
    ("a/b/c", "not a Hub repo id"),
])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_hub_errors(tmp_path, src, calib, offline, source, fragment, command):
    args = (["inspect", source] if command == "inspect"
            else convert_args(source, tmp_path / "out", calib))
    assert_refused(tmp_path, src, args, fragment)


# --- concurrency (separate processes) ---------------------------------------------------------

def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.hcconvert-lock"


def cli(*args, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_second_run_on_a_locked_out_refuses(tmp_path, src, calib):
    out = tmp_path / "out"
    with open(lock_path(out), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a first run holds it, for as long as it runs
        process = cli(*convert_args(src, out, calib), cwd=tmp_path)
        _, stderr = process.communicate(timeout=120)
    assert_one_error_line(process.returncode, stderr, "in use by another hcconvert run")
    assert sorted(os.listdir(tmp_path)) == sorted(["src", "calib.txt", lock_path(out).name])


def test_stale_lock_file_does_not_block(tmp_path, src, calib):
    """A run killed outright leaves its lock file, but not its lock."""
    out = tmp_path / "out"
    lock_path(out).write_text("")
    result = CliRunner().invoke(main, [str(a) for a in convert_args(src, out, calib)])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "out", "src"]


def test_two_runs_on_one_out(tmp_path, src, calib):
    """Defect: two runs shared one staging path and one reported success with missing shards.
    Whatever the timing, at most one publishes; the other refuses in one line."""
    out = tmp_path / "out"
    runs = [cli(*convert_args(src, out, calib), cwd=tmp_path) for _ in range(2)]
    results = []
    for run in runs:
        _, stderr = run.communicate(timeout=180)
        results.append((run.returncode, stderr))
    assert sorted(code for code, _ in results)[0] == 0, results
    for code, stderr in results:
        if code != 0:
            assert_one_error_line(code, stderr, "--out")
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert all((out / shard).is_file() for shard in set(weight_map.values()))
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "out", "src"]


# --- signals ----------------------------------------------------------------------------------

def wait_for_staging(process: subprocess.Popen, workspace: Path) -> None:
    """Until the run is under way: it holds the lock and has made its staging directory."""
    deadline = time.monotonic() + 120
    while not list(workspace.glob(".out.hcconvert-tmp-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_cleans_up(tmp_path, src, signum):
    """The run is held under way (lock taken, staging made, reading calibration text from a
    pipe nobody writes to) when the signal arrives."""
    calib = tmp_path / "calib.txt"
    os.mkfifo(calib)
    before = tree_digest(src)
    process = cli(*convert_args(src, tmp_path / "out", calib), cwd=tmp_path)
    wait_for_staging(process, tmp_path)
    assert lock_path(tmp_path / "out").exists()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert_one_error_line(process.returncode, stderr, f"interrupted by {name}", 128 + signum)
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "src"]
    assert tree_digest(src) == before


def test_ignored_hangup_stays_ignored(tmp_path, src):
    """Under nohup (SIGHUP ignored) a hangup must not stop the run."""
    calib = tmp_path / "calib.txt"
    os.mkfifo(calib)
    process = cli(*convert_args(src, tmp_path / "out", calib), cwd=tmp_path,
                  preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup
    wait_for_staging(process, tmp_path)
    process.send_signal(signal.SIGHUP)
    with open(calib, "w") as writer:  # let the run go on: it must still be alive to read
        writer.write(Path(data_file("demo_calib.txt")).read_text())
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "out", "src"]


def test_signal_while_publishing_is_held_until_the_output_is_whole(tmp_path, src, monkeypatch):
    """A signal that lands between moving the old --out aside and moving the new one in is
    acted on only once the new output is in place: never neither, never half."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    replace = os.replace

    def replace_then_signal(source, target):
        replace(source, target)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as caught, signals_as_interrupts():
        with staged_outputs([out], src, overwrite=True) as (staging,):
            (staging / "new.txt").write_text("new output")
            monkeypatch.setattr(os, "replace", replace_then_signal)
    assert caught.value.published and caught.value.signum == signal.SIGTERM
    assert os.listdir(out) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# --- bounded memory for calibration text ------------------------------------------------------

PEAK_RSS = """
import sys
from pathlib import Path
from hcconvert.pipeline.calibration import TextTokenizer, text_tokens
tokens = text_tokens(Path(sys.argv[1]), TextTokenizer(Path(sys.argv[2])), 2, 32, 0)
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(tokens.shape[0], peak)
"""


def peak_kib(text: Path, model_dir: Path) -> int:
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(text), str(model_dir)],
                         capture_output=True, text=True, timeout=120)
    samples, peak = map(int, run.stdout.split())
    assert run.returncode == 0 and samples == 2, run.stderr
    return peak


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calibration_memory_does_not_grow_with_file_size(tmp_path, pristine, suffix):
    """One document without a blank line (or one JSON line): 2 MB and 40 MB peak alike."""
    peaks = []
    for megabytes in (2, 40):
        text = "calibration words " * (megabytes * 2**20 // 18)
        path = tmp_path / f"{megabytes}{suffix}"
        path.write_text(text if suffix == ".txt" else json.dumps({"text": text}))
        peaks.append(peak_kib(path, pristine))
        path.unlink()
    assert peaks[1] - peaks[0] < 16 * 1024, peaks  # KiB: far below the 38 MB of extra text


def test_torch_sees_no_nan_from_a_clean_checkpoint(src):
    """The scan itself: a clean checkpoint's tensors pass it (guards against a scan that
    refuses everything, which would make the NaN cases above pass for the wrong reason)."""
    from hcconvert.io.source import Checkpoint, check_finite

    ckpt = Checkpoint(src)
    tensors = ckpt.read(list(ckpt.tensors))
    check_finite(tensors)
    tensors["model.norm.weight"][0] = torch.nan
    with pytest.raises(UserError, match="model.norm.weight"):
        check_finite(tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16,
                                   torch.float8_e4m3fn])
def test_scan_finds_each_non_finite_value_and_passes_a_sum_that_overflows(dtype):
    """The scan screens bf16 and fp32 with a sum: a NaN, an infinity of either sign, and
    infinities that cancel to NaN are refused in every dtype; finite values near the top of
    the range, whose sum overflows, are not."""
    from hcconvert.io.source import check_finite

    big = torch.finfo(dtype).max
    check_finite({"w": torch.full((64,), big, dtype=torch.float32).to(dtype)})
    bad_values = [[float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]]
    if dtype == torch.float8_e4m3fn:  # no infinity: what should be one is NaN
        bad_values = [[float("nan")]]
    for values in bad_values:
        tensor = torch.zeros(64, dtype=torch.float32)
        tensor[:len(values)] = torch.tensor(values)
        with pytest.raises(UserError, match="tensor w holds NaN"):
            check_finite({"w": tensor.to(dtype)})
