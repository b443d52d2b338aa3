"""The command line: bad input gives one line on stderr, exit code 2, and writes nothing."""

import json

import pytest
import torch
from checkpoints import save_tiny_mixtral, tree_digest
from cli_runs import assert_user_error, convert_args, run


@pytest.fixture
def src(tmp_path):
    return save_tiny_mixtral(tmp_path / "src")


def break_index(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"]["model.layers.0.self_attn.q_proj.extra"] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.0.self_attn.q_proj.extra"


def truncate_shard(src):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return shard.name


def set_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


BAD_SOURCES = {
    # damage done to a valid checkpoint -> a fragment the one-line error must contain
    "shard missing": (lambda s: sorted(s.glob("model-*.safetensors"))[0].unlink(), "missing"),
    "shard truncated": (truncate_shard, "truncated"),
    "index names a missing tensor": (break_index, "q_proj.extra"),
    "tensor missing from index": (
        lambda s: (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            k: v for k, v in json.loads((s / "model.safetensors.index.json").read_text())
            ["weight_map"].items() if "layers.1.block_sparse_moe.gate" not in k}})),
        "model.layers.1.block_sparse_moe.gate.weight"),
    "non-MoE model_type": (lambda s: set_config(s, model_type="llama"), "'llama'"),
    "unknown model_type": (lambda s: set_config(s, model_type="frobnicator"), "supported:"),
    "tokenizer missing": (lambda s: (s / "tokenizer.json").unlink(), "tokenizer.json"),
    "heads disagree with weights": (lambda s: set_config(s, num_attention_heads=8),
                                    "k_proj.weight has shape [16, 32], expected [8, 32]"),
    "top-k above expert count": (lambda s: set_config(s, num_experts_per_tok=7), "top-7"),
    "config missing": (lambda s: (s / "config.json").unlink(), "config.json"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_fails_cleanly(tmp_path, src, calib_text, case):
    damage, fragment = BAD_SOURCES[case]
    damage(src)
    before = tree_digest(src)
    result = run(*convert_args(src, tmp_path / "out", calib_text))
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()
    assert tree_digest(src) == before
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("experts,fragment", [(0, "at least 1"), (6, "between 1 and 5"),
                                              (9, "between 1 and 5")])
def test_bad_expert_count(tmp_path, src, calib_text, experts, fragment):
    args = list(convert_args(src, tmp_path / "out", calib_text))
    args[2] = experts
    assert_user_error(run(*args), fragment)
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path, calib_text):
    assert_user_error(run(*convert_args(tmp_path / "nope", tmp_path / "out", calib_text)),
                      "no such directory")


def test_missing_directory_that_looks_like_a_hub_id(tmp_path, calib_text, monkeypatch):
    """models/mixtral with models/ present is a typo: no Hub lookup, 'no such directory'."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for command in (("inspect", "models/mixtral"),
                    convert_args("models/mixtral", tmp_path / "out", calib_text)):
        assert_user_error(run(*command), "source models/mixtral: no such directory")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_calibration(tmp_path, src, content):
    calib = tmp_path / "empty.txt"
    calib.write_text(content)
    assert_user_error(run(*convert_args(src, tmp_path / "out", calib)), "no text")
    assert not (tmp_path / "out").exists()


def test_missing_calibration_file(tmp_path, src):
    assert_user_error(run(*convert_args(src, tmp_path / "out", tmp_path / "nope.jsonl")),
                      "does not exist")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_equal_to_or_inside_source(src, calib_text, where):
    out = src if where == "same" else src / "sub"
    before = tree_digest(src)
    assert_user_error(run(*convert_args(src, out, calib_text)), "source directory")
    assert tree_digest(src) == before


def test_non_empty_out_needs_overwrite(tmp_path, src, calib_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run(*convert_args(src, out, calib_text)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(*convert_args(src, out, calib_text, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_convert_prints_summary(tmp_path, src, calib_text):
    result = run(*convert_args(src, tmp_path / "out", calib_text))
    assert result.exit_code == 0, result.stderr
    assert "6 -> 3 experts" in result.stdout and "peak memory" in result.stdout


def test_dry_run_writes_nothing(tmp_path, src, calib_text):
    result = run(src, "--experts", 3, "--dry-run", "--calib", calib_text)
    assert result.exit_code == 0, result.stderr
    assert "experts       6 -> 3" in result.stdout and "memory (est.)" in result.stdout
    assert list(tmp_path.iterdir()) == [src]


def test_calibration_jsonl_and_gzip(tmp_path, src, calib_text):
    import gzip

    docs = calib_text.read_text().split("\n\n")
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "c.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        f.write(lines)
    for i, name in enumerate(("c.jsonl", "c.json.gz")):
        result = run(*convert_args(src, tmp_path / f"out{i}", tmp_path / name))
        assert result.exit_code == 0, result.stderr


def test_eval_reports_perplexity_and_kl(tmp_path, src, calib_text, eval_text):
    assert run(*convert_args(src, tmp_path / "out", calib_text)).exit_code == 0
    result = run("eval", src, tmp_path / "out", "--text", eval_text, "--seq-len", 64,
                 "--samples", 4)
    assert result.exit_code == 0, result.stderr
    assert "| perplexity (original) |" in result.stdout and "KL(" in result.stdout
    assert "| repeated 4-grams per continuation (original's own) |" in result.stdout
    assert "greedy continuation" in result.stderr  # its passes over the weights show progress
    same = run("eval", src, src, "--text", eval_text, "--seq-len", 64, "--samples", 4)
    assert "| KL(original ‖ reduced), nats/token | 0.00000 |" in same.stdout


def test_eval_gives_a_column_per_text(tmp_path, src, calib_text, eval_text):
    result = run("eval", src, src, "--text", f"{eval_text},{calib_text}", "--seq-len", 32,
                 "--samples", 2)
    assert result.exit_code == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header == f"| | all | {eval_text.name} | {calib_text.name} |"
    assert "| KL(original ‖ reduced), nats/token | 0.00000 | 0.00000 | 0.00000 |" \
        in result.stdout


def test_inspect(src):
    result = run("inspect", src)
    assert result.exit_code == 0, result.stderr
    assert "mixtral" in result.stdout and "6 routed, top-2" in result.stdout


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")


def test_offline_without_calib_is_a_clear_error(tmp_path, src, offline):
    result = run(src, "--experts", 3, "--out", tmp_path / "out")
    assert_user_error(result, "--calib")
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_is_a_clear_error(tmp_path, offline):
    assert_user_error(run("someone/some-moe", "--experts", 2, "--out", tmp_path / "out"),
                      "cannot download")


def test_out_holding_the_source_is_refused_even_with_overwrite(tmp_path, src, calib_text):
    before = tree_digest(src)
    result = run(*convert_args(src, tmp_path, calib_text, "--overwrite"))
    assert_user_error(result, "contains the source")
    assert tree_digest(src) == before


def test_out_holding_the_working_directory_is_refused(tmp_path, src, calib_text, monkeypatch):
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "inner")
    for out in (".", ".."):  # the working directory, and one above it (SRC is elsewhere)
        assert_user_error(run(*convert_args(src, out, calib_text, "--overwrite")),
                          "working directory")
    assert (work / "notes.txt").read_text() == "mine"


BAD_FILES = {
    # a file of a valid checkpoint replaced by garbage -> a fragment of the one-line error
    "model.safetensors.index.json": "not a valid safetensors index",
    "tokenizer.json": "cannot read the tokenizer",
    "tokenizer_config.json": "cannot read the tokenizer",
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_malformed_side_file(tmp_path, src, calib_text, name):
    (src / name).write_text("{not json")
    assert_user_error(run(*convert_args(src, tmp_path / "out", calib_text)), BAD_FILES[name])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,fragment", [
    ("--seed", "-1", "--seed"),
    ("--max-shard-size", "infGB", "--max-shard-size"),
])
def test_bad_numbers(tmp_path, src, calib_text, option, value, fragment):
    assert_user_error(run(*convert_args(src, tmp_path / "out", calib_text, option, value)),
                      fragment)


def test_unwritable_out_parent(tmp_path, src, calib_text):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_user_error(run(*convert_args(src, blocker / "out", calib_text)), str(blocker))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_calibration_mixes_sources_by_weight(tmp_path, src, calib_text):
    """Two sources at 3:1 give 3 and 1 samples, each cut from its own text."""
    from hcconvert.io.source import Checkpoint
    from hcconvert.pipeline.calibration import load_calibration

    other = write_jsonl(tmp_path / "other.jsonl",
                        [{"body": "zebra quartz " * 400}, {"body": "jumping fox " * 400}])
    tokens = load_calibration(Checkpoint(src), f"{calib_text}:3,{other}:1", 4, 32, 42,
                              field="body")
    alone = load_calibration(Checkpoint(src), str(calib_text), 3, 32, 42)
    assert tokens.shape == (4, 32)
    torch.testing.assert_close(tokens[:3], alone)
    mixed_in = load_calibration(Checkpoint(src), str(other), 1, 32, 42, field="body")
    torch.testing.assert_close(tokens[3:], mixed_in)


def test_sample_counts_keep_their_split_and_bear_huge_weights():
    """Ordinary weights split as they always have (a tie at 3.5 / 10.5 included: the counts
    are part of the run's calibration); weights near fp64's limit no longer overflow."""
    from hcconvert.pipeline.calibration import sample_counts

    assert sample_counts([1, 3], 16) == [5, 11]
    assert sample_counts([0.3, 0.1], 16) == [12, 4]
    assert sample_counts([1e308, 1e308, 1], 4) == [2, 1, 1]
    assert sample_counts([1e308, 1], 100) == [99, 1]


def test_chat_lines_use_the_models_chat_template(tmp_path, src):
    from hcconvert.model.tokenizer import TextTokenizer

    (src / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    tokenizer = TextTokenizer(src)
    read = tokenizer.json_reader("text")
    line = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    assert read(line, False, 1) == "<user>hi\n<assistant>hello\n"
    (src / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        TextTokenizer(src).json_reader("text")(line, False, 1)


@pytest.mark.parametrize("calib,extra,fragment", [
    ("data.csv", (), "unknown file type"),
    ("{calib}:0", (), "a weight must be a positive finite number"),
    ("{calib}:inf,{calib}:1", (), "a weight must be a positive finite number"),
    ("{calib}:1e308,{calib}:1e308,{calib}:1", ("--calib-samples", "4"), ""),
    ("{calib}:1,{calib}:1", ("--calib-samples", "1"), "--calib-samples must be at least 2"),
    ("{calib}", ("--text-field", "body"), ""),  # a .txt has no fields: the option is moot
    ("{jsonl}", ("--text-field", "body"), 'has no "body" field'),
    ("{calib}", ("--seq-len", "4096"), "above the model's max_position_embeddings (512)"),
    ("{tiny}", ("--seq-len", "64"), "fewer than one 64-token sample"),
])
def test_calibration_refusals(tmp_path, src, calib_text, calib, extra, fragment):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"text": "some words " * 50}])
    (tmp_path / "tiny.txt").write_text("a few words")
    path = calib.format(calib=calib_text, jsonl=jsonl, tiny=tmp_path / "tiny.txt")
    if not path.startswith("/"):
        path = str(tmp_path / path)
    result = run(*convert_args(src, tmp_path / "out", path), *extra)
    if not fragment:
        assert result.exit_code == 0, result.stderr
        return
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()
