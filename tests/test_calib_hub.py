"""--calib from Hub datasets against a fake Hub: hf:ORG/NAME entries mixed with files, configs
and splits from the card or the file names, parquet and JSON lines, text fields, pairs and chat
messages; only the files the samples need fetched, through the HF cache, so a second run and
an offline one fetch nothing; bad datasets, configs, splits and fields refused in one line by
--dry-run (from metadata, no data downloaded) and the run alike; hcconvert.json's commit makes
--recipe read the same tokens after the branch moved."""

import json
import time
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from checkpoints import save_tiny_mixtral, tree_digest
from cli_runs import assert_user_error, convert_args, run
from fake_hub import fake_hub_session

import hcconvert.pipeline.convert
from hcconvert.io import text
from hcconvert.io.source import Checkpoint
from hcconvert.pipeline.calibration import (
    HubDataset,
    calibration_sources,
    load_calibration,
    pinned_sources,
)

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (3 + i % 5)
        for i in range(40)]
CARD = """---
configs:
- config_name: code
  default: true
  data_files:
  - split: train
    path: code/train-*.parquet
  - split: test
    path: code/test-*.parquet
- config_name: chat
  data_files: chat/*.jsonl
---
# a dataset
"""
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
CHATS = [[{"role": "user", "content": f"question {i}"},
          {"role": "assistant", "content": f"answer {i} " + "words " * 20}] for i in range(12)]


def write_parquet(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mix_repo(root: Path, docs: list[str]) -> Path:
    """A dataset with a card: config code (parquet, train in two files, and test; default)
    and config chat (JSON lines of chat messages)."""
    (root / "code").mkdir(parents=True)
    (root / "README.md").write_text(CARD)
    half = len(docs) // 2
    write_parquet(root / "code/train-00000.parquet", [{"text": d, "n": 1} for d in docs[:half]])
    write_parquet(root / "code/train-00001.parquet", [{"text": d, "n": 2} for d in docs[half:]])
    write_parquet(root / "code/test-00000.parquet", [{"text": "held out " * 40}])
    write_jsonl(root / "chat/part-0.jsonl", [{"messages": m} for m in CHATS])
    return root


def plain_repo(root: Path) -> Path:
    """A dataset without a card: splits from the file names, instruction/output pairs."""
    write_jsonl(root / "train.jsonl", [{"instruction": f"do {i}", "output": "done " * 30}
                                       for i in range(10)])
    write_jsonl(root / "test.jsonl", [{"instruction": "held", "output": "out " * 60}])
    return root


@pytest.fixture
def src(tmp_path):
    model = save_tiny_mixtral(tmp_path / "src")
    (model / "chat_template.jinja").write_text(TEMPLATE)
    return model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    session = fake_hub_session(tmp_path, monkeypatch)
    fake = next(session)
    fake.add_dataset("org/mix", mix_repo(tmp_path / "mix", DOCS))
    fake.add_dataset("org/plain", plain_repo(tmp_path / "plain"))
    yield fake
    next(session, None)


def tokens(src, calib, samples=4, seq_len=32, field="text"):
    return load_calibration(Checkpoint(src), calib, samples, seq_len, 42, field)


def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def cached_data_files() -> list[str]:
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    return sorted(p.name for p in cache.rglob("*") if p.suffix in (".parquet", ".jsonl"))


def test_a_dataset_reads_as_its_files_read_locally(hub, src, tmp_path):
    local = write_jsonl(tmp_path / "same.jsonl", [{"text": d} for d in DOCS])
    assert torch.equal(tokens(src, "hf:org/mix"), tokens(src, str(local)))
    assert hub.downloads() == ["code/train-00000.parquet", "code/train-00001.parquet"]
    # A named config and split, and weights beside a local file
    mixed = tokens(src, f"hf:org/mix:config=code:split=test:1,{local}:3", samples=5)
    test_split = write_jsonl(tmp_path / "test.jsonl", [{"text": "held out " * 40}])
    assert torch.equal(mixed[:2], tokens(src, str(test_split), samples=2))  # 5 as 2 + 3
    assert torch.equal(mixed[2:], tokens(src, str(local), samples=3))


def test_only_the_files_the_samples_need_are_fetched_and_then_cached(hub, src, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(text, "MAX_DOCUMENTS", 20)  # the first file's rows are enough
    first = tokens(src, "hf:org/mix")
    assert hub.downloads() == ["code/train-00000.parquet"]
    local = write_jsonl(tmp_path / "head.jsonl", [{"text": d} for d in DOCS])
    assert torch.equal(first, tokens(src, str(local)))
    assert torch.equal(tokens(src, "hf:org/mix"), first)
    assert hub.downloads() == ["code/train-00000.parquet"]  # the second run: from the cache
    offline(monkeypatch)
    del hub.state.requests[:]
    assert torch.equal(tokens(src, "hf:org/mix"), first)
    assert not hub.state.requests


def test_chat_messages_and_pairs_go_through_the_chat_template(hub, src, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    assert torch.equal(tokens(src, "hf:org/mix:config=chat"), tokens(src, str(chats)))
    pairs = [{"messages": [{"role": "user", "content": f"do {i}"},
                           {"role": "assistant", "content": "done " * 30}]} for i in range(10)]
    as_chat = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert torch.equal(tokens(src, "hf:org/plain:field=instruction+output"),
                       tokens(src, str(as_chat)))
    # --text-field gives every source's field; a dataset's own field= wins
    assert torch.equal(tokens(src, "hf:org/plain", field="instruction+output"),
                       tokens(src, str(as_chat)))
    rendered = text.JsonText("instruction+output", None).record(
        {"instruction": "a", "output": "b"}, "row 1")
    assert rendered == "a\n\nb"  # no chat template: the pair a blank line apart


def test_files_narrow_a_dataset_to_a_glob(hub, src, tmp_path):
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": d} for d in DOCS[20:]])
    assert torch.equal(tokens(src, "hf:org/mix:files=code/train-00001.*"),
                       tokens(src, str(second)))
    assert hub.downloads() == ["code/train-00001.parquet"]


def test_splits_from_file_names_without_a_card(hub, src, tmp_path):
    record = {"messages": [{"role": "user", "content": "held"},
                           {"role": "assistant", "content": "out " * 60}]}
    pair = write_jsonl(tmp_path / "pair.jsonl", [record])
    assert torch.equal(tokens(src, "hf:org/plain:split=test:field=instruction+output",
                              samples=1), tokens(src, str(pair), samples=1))


@pytest.mark.parametrize("calib,fragment", [
    ("hf:org/nope", "--calib hf:org/nope: no such repo"),
    ("hf:org/mix@v9", "--calib hf:org/mix@v9: no such revision"),
    ("hf:org/mix:config=nope", "has no config 'nope'; its configs: code, chat"),
    ("hf:org/mix:split=dev", "has no split 'dev'; its splits: train, test"),
    ("hf:org/mix:field=body", 'no "body" column (nor chat "messages"); columns: text, n'),
    ("hf:org/plain:field=body", 'line 1 has no "body" field'),
    ("hf:org/plain:field=instruction+answer", 'line 1 has no "answer" field'),
    ("hf:org/mix:colour=red", "colour is no KEY=VALUE for a dataset"),
    ("hf:org/mix:files=*.csv", "no file matches files=*.csv"),
    ("hf:org/mix:files=code/*:split=test", "files= names the files itself"),
    ("hf:org/mix:lots", "after the dataset come :KEY=VALUE"),
    ("hf:org/mix:0", "a weight must be a positive finite number"),
    ("hf:org/a/b", "is not a Hub dataset id"),
])
def test_bad_datasets_are_one_line_before_any_download(hub, src, tmp_path, monkeypatch,
                                                        calib, fragment):
    calls = []
    monkeypatch.setattr(hcconvert.pipeline.convert, "convert",
                        lambda *args, **kw: calls.append(args))
    for extra in (("--dry-run",), ()):
        assert_user_error(run(*convert_args(src, tmp_path / "out", calib), *extra), fragment)
    assert not calls and not (tmp_path / "out").exists()
    assert hub.downloads() == [] and cached_data_files() == []


def test_dry_run_checks_from_metadata_alone(hub, src, tmp_path):
    local = write_jsonl(tmp_path / "other.jsonl", [{"text": d} for d in DOCS])
    calib = f"hf:org/mix:0.7,hf:org/plain:field=instruction+output:0.2,{local}:0.1"
    result = run(*convert_args(src, tmp_path / "out", calib), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "calibration   2 x 32 tokens (counted by the run)" in result.stdout
    assert hub.downloads() == [] and cached_data_files() == []
    ranged = [r for r in hub.state.requests if "/resolve/" in r.path]
    assert ranged and all(r.range for r in ranged)  # a footer, a first line: by range
    assert sum(r.bytes_sent for r in ranged) < 4 * 65536


def test_offline_without_the_cache_is_one_fast_line(hub, src, tmp_path, monkeypatch):
    offline(monkeypatch)
    for extra in (("--dry-run",), ()):
        start = time.monotonic()
        assert_user_error(run(*convert_args(src, tmp_path / "out", "hf:org/mix"), *extra),
                          "--calib hf:org/mix: offline (HF_HUB_OFFLINE is set, or the Hub is "
                          "unreachable) and the dataset is not in the HF cache")
        assert time.monotonic() - start < 10
    assert not hub.state.requests


def test_offline_with_the_listing_but_not_the_files(hub, src, tmp_path, monkeypatch):
    """A dry run online keeps the listing, not the data: offline, the run would need the
    first file, so the dry run and the run refuse the same way."""
    args = convert_args(src, tmp_path / "out", "hf:org/mix")
    assert run(*args, "--dry-run").exit_code == 0
    offline(monkeypatch)
    for extra in (("--dry-run",), ()):
        assert_user_error(run(*args, *extra), "code/train-00000.parquet is not in the HF cache")


def test_convert_online_offline_and_replay_the_recipe_after_the_branch_moved(
        hub, src, tmp_path, monkeypatch):
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": d[::-1]} for d in DOCS])
    calib = f"hf:org/mix:0.7,{other}:0.3"
    first = tmp_path / "first"
    result = run(*convert_args(src, first, calib))
    assert result.exit_code == 0, result.stderr
    record = json.loads((first / "hcconvert.json").read_text())
    commit = hub.state.datasets["org/mix"].refs["main"]
    assert record["calibration"]["datasets"] == [
        {"dataset": "org/mix", "commit": commit, "config": None, "split": "train",
         "files": None, "field": None, "weight": 0.7}]
    assert record["options"]["calib"] == f"hf:org/mix@{commit}:0.7,{other}:0.3"
    before = tokens(src, calib)

    moved = mix_repo(tmp_path / "mix-2", [d.upper() for d in DOCS])
    hub.add_dataset("org/mix", moved)  # main moves on: other text
    assert not torch.equal(tokens(src, calib), before)
    assert torch.equal(tokens(src, record["options"]["calib"]), before)
    offline(monkeypatch)  # the recipe's commit is cached: no Hub needed
    replay = run("convert", "--recipe", first / "hcconvert.json", "--out", tmp_path / "again")
    assert replay.exit_code == 0, replay.stderr
    weights = {name: digest for name, digest in tree_digest(first).items()
               if name not in ("hcconvert.json", "README.md")}
    assert {name: digest for name, digest in tree_digest(tmp_path / "again").items()
            if name in weights} == weights


def test_entries_parse_and_pin(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = calibration_sources("hf:org/mix@v1:config=code:split=test:field=a+b:2,"
                                  "./hf:org/x:1,data.jsonl")
    assert sources == [(HubDataset("org/mix", "v1", "code", "test", "a+b"), 2.0),
                       (Path("hf:org/x"), 1.0), (Path("data.jsonl"), 1.0)]
    commit = hub.state.datasets["org/mix"].refs["main"]
    assert pinned_sources("hf:org/mix:config=chat") == f"hf:org/mix@{commit}:config=chat"
    assert pinned_sources("data.jsonl,hf:org/plain") == (
        f"{tmp_path / 'data.jsonl'}:1.0,"
        f"hf:org/plain@{hub.state.datasets['org/plain'].refs['main']}:1.0")


def test_a_local_parquet_file(src, tmp_path):
    path = tmp_path / "docs.parquet"
    write_parquet(path, [{"text": d} for d in DOCS])
    local = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    assert torch.equal(tokens(src, str(path)), tokens(src, str(local)))
    result = run(*convert_args(src, tmp_path / "out", path), "--text-field", "body")
    assert_user_error(result, f'cannot read calibration file {path}: no "body" column')
