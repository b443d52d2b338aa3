"""`hcconvert compare`: several methods from one calibration pass, each evaluated; a table,
CSV and JSON; the shared pass computes each layer's statistics once and writes what separate
conversions would."""

import csv
import dataclasses
import json

import pytest
import torch
from checkpoints import load_all, save_tiny_mixtral, tree_digest
from cli_runs import assert_user_error, run

import hcconvert.pipeline.convert
from hcconvert.eval.compare import compare, named_variants, planned_bytes, shared_passes
from hcconvert.eval.evaluate import evaluate, evaluate_many
from hcconvert.eval.greedy import CONTINUATION_TOKENS
from hcconvert.pipeline.convert import convert, convert_many
from hcconvert.pipeline.options import ConvertOptions

SMALL = dict(calib_samples=2, seq_len=32)


@pytest.fixture
def src(tmp_path):
    return save_tiny_mixtral(tmp_path / "src")


def test_compare_prints_a_row_per_method_and_writes_csv_and_json(tmp_path, src, calib_text,
                                                                   eval_text):
    methods = ["hc-smoe", "f-prune", "o-prune", "msmoe"]
    result = run("compare", src, "--experts", 3, "--calib", calib_text, "--eval", eval_text,
                 "--methods", ",".join(methods), "--calib-samples", 2, "--seq-len", 32,
                 "--eval-seq-len", 32, "--eval-samples", 2, "--out-dir", tmp_path / "runs",
                 "--csv", tmp_path / "r.csv", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["(original)", *methods]
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["method"] for row in table] == methods
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in records] == methods
    for record in records:
        assert record["kl"] >= 0 and record["perplexity"] > 0 and record["minutes"] > 0
        assert (tmp_path / "runs" / record["method"] / "hcconvert.json").is_file()


def test_statistics_are_collected_once_per_layer(tmp_path, src, calib_text, eval_text,
                                                 monkeypatch):
    calls = []
    collect = hcconvert.pipeline.convert.collect_layer_stats

    def counting(*args, **kwargs):
        calls.append(kwargs.get("needs", args[4] if len(args) > 4 else None))
        return collect(*args, **kwargs)

    monkeypatch.setattr(hcconvert.pipeline.convert, "collect_layer_stats", counting)
    base = ConvertOptions(method="hc-smoe", experts=3, calib=str(calib_text), **SMALL)
    variants = named_variants(["hc-smoe", "weights", "router-logits", "o-prune", "mergemoe"],
                              base)
    results = compare(str(src), variants, eval_text, tmp_path / "runs", seq_len=32, samples=2)
    assert len(results) == 5
    assert len(calls) == 2  # two MoE layers, one collection each for all five methods
    assert calls[0] == {"output", "weights", "router-logits", "saliency"}


def test_shared_pass_writes_what_separate_conversions_write(tmp_path, src, calib_text):
    base = ConvertOptions(method="hc-smoe", experts=3, calib=str(calib_text), **SMALL)
    variants = named_variants(["msmoe", "o-prune", "mergemoe", "fix-dom"], base)
    convert_many(str(src), [(tmp_path / "shared" / name, options)
                            for name, options in variants.items()], progress=False)
    for name, options in variants.items():
        convert(str(src), tmp_path / "alone" / name, options, progress=False)
        shared, alone = load_all(tmp_path / "shared" / name), load_all(tmp_path / "alone" / name)
        assert shared.keys() == alone.keys()
        for key, tensor in alone.items():
            assert torch.equal(shared[key], tensor), (name, key)


def test_merged_propagation_gets_a_pass_of_its_own():
    base = ConvertOptions(method="hc-smoe", experts=3)
    variants = {"a": base, "b": dataclasses.replace(base, merge="average"),
                "c": dataclasses.replace(base, propagate="merged"),
                "d": dataclasses.replace(base, seed=1)}
    assert shared_passes(variants) == [["a", "b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match="propagate merged"):
        convert_many("unused", [("x", base), ("y", variants["c"])])


def test_unknown_method_is_a_one_line_error(tmp_path, src, calib_text, eval_text):
    result = run("compare", src, "--experts", 3, "--calib", calib_text, "--eval", eval_text,
                 "--methods", "hc-smoe,nope")
    assert_user_error(result, "unknown method 'nope'")


@pytest.mark.parametrize("option,target,fragment", [
    ("--csv", "src/config.json", "--csv {path} is inside the source directory"),
    ("--json", "src/model.safetensors.index.json", "--json {path} is inside the source"),
    ("--csv", "nodir/r.csv", "--csv {path}: {parent} is not a directory"),
])
def test_results_file_is_checked_before_any_work(tmp_path, src, calib_text, eval_text,
                                                 option, target, fragment):
    """compare's --csv and --json never write into SRC (its config or index would be lost),
    and a file that cannot be written is refused before the conversions, not after them."""
    path = tmp_path / target
    before = tree_digest(src)
    result = run("compare", src, "--experts", 3, "--calib", calib_text, "--eval", eval_text,
                 "--methods", "o-prune", "--calib-samples", 2, "--seq-len", 32, option, path)
    assert_user_error(result, fragment.format(path=path, parent=path.parent))
    assert tree_digest(src) == before
    assert "disk:" not in result.stderr  # refused before planning anything


def test_bad_eval_text_is_refused_before_the_conversions(tmp_path, src, calib_text):
    (tmp_path / "empty.txt").write_text("")
    result = run("compare", src, "--experts", 3, "--calib", calib_text, "--eval",
                 tmp_path / "empty.txt", "--methods", "o-prune", "--calib-samples", 2,
                 "--seq-len", 32, "--out-dir", tmp_path / "runs")
    assert_user_error(result, "empty.txt")
    assert not (tmp_path / "runs").exists()  # nothing converted


def test_evaluate_many_equals_one_at_a_time(tmp_path, calib_text, eval_text):
    """The original streams once beside every reduction; the scores are unchanged."""
    src = save_tiny_mixtral(tmp_path / "src")
    outs = []
    for experts in (2, 4):
        outs.append(str(tmp_path / f"out{experts}"))
        convert(str(src), tmp_path / f"out{experts}", ConvertOptions(
            method="hc-smoe",
            experts=experts, calib=str(calib_text), calib_samples=2, seq_len=32), progress=False)
    together = evaluate_many(str(src), outs, eval_text, seq_len=32, samples=3, progress=False)
    alone = [evaluate(str(src), out, eval_text, seq_len=32, samples=3, progress=False)
             for out in outs]
    assert together == alone
    assert together[0].kl > together[1].kl > 0  # fewer experts, further from the original


def test_planned_disk_is_what_the_outputs_take_and_own_minutes_exclude_the_shared_pass(
        tmp_path, src, calib_text, eval_text):
    variants = named_variants(["f-prune", "o-prune"], ConvertOptions(
        method="hc-smoe", experts=2, calib=str(calib_text), **SMALL))
    planned = planned_bytes(str(src), variants)
    results = compare(str(src), variants, eval_text, tmp_path / "runs", seq_len=32, samples=2)
    written = sum(path.stat().st_size for path in (tmp_path / "runs").rglob("*.safetensors"))
    assert 0.95 * written < planned <= written  # shards add only their small headers
    for result in results:
        assert 0 < result.shared_minutes < result.convert_minutes
        own = result.convert_minutes - result.shared_minutes
        assert result.own_minutes == pytest.approx(own)


def test_a_model_agrees_with_itself_at_every_position_and_every_greedy_token(src, eval_text):
    (fidelity,) = evaluate_many(str(src), [str(src)], eval_text, seq_len=32, samples=2,
                                progress=False)
    assert fidelity.kl == pytest.approx(0, abs=1e-6)
    assert fidelity.top1_agreement == 1.0
    assert fidelity.greedy_match == CONTINUATION_TOKENS


def test_eval_record_writes_the_numbers_into_the_card(tmp_path, calib_text, eval_text):
    """`eval --record` (and compare, for its outputs) puts the numbers into the reduced
    checkpoint's hcconvert.json and a last Evaluation section of its card, replacing any
    earlier one; a directory hcconvert did not write is refused in one line."""
    from click.testing import CliRunner

    from hcconvert.cli.main import main

    src = save_tiny_mixtral(tmp_path / "src")
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(experts=3, calib=str(calib_text), calib_samples=2,
                                          seq_len=32), progress=False)
    args = ["eval", str(src), str(out), "--text", str(eval_text), "--seq-len", "32",
            "--samples", "2", "--record"]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and card.rstrip().endswith("|")
    evaluation = json.loads((out / "hcconvert.json").read_text())["evaluation"]
    assert f"| KL(original ‖ reduced), nats/token | {evaluation['kl']:.5f} |" in card
    assert "| repeated 4-grams per continuation (original's own) |" in card
    refused = CliRunner().invoke(main, ["eval", str(src), str(src), "--text", str(eval_text),
                                        "--record"])
    assert refused.exit_code == 2 and "not a directory hcconvert wrote" in refused.output


def scores(fidelity):
    return {k: v for k, v in dataclasses.asdict(fidelity).items() if k != "sources"}


def test_each_text_is_scored_as_it_would_be_alone(tmp_path, src, calib_text, eval_text):
    """With several evaluation texts, each text's scores are those an evaluation on it alone
    gives; the scores over all pool their tokens and prompts."""
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(method="hc-smoe", experts=3, calib=str(calib_text),
                                          **SMALL), progress=False)
    (both,) = evaluate_many(str(src), [str(out)], [eval_text, calib_text], seq_len=32,
                            samples=3, progress=False)
    assert list(both.sources) == [eval_text.name, calib_text.name]
    for text in (eval_text, calib_text):
        (alone,) = evaluate_many(str(src), [str(out)], text, seq_len=32, samples=3,
                                 progress=False)
        assert alone.sources is None
        assert scores(both.sources[text.name]) == pytest.approx(scores(alone), rel=1e-6)
    parts = both.sources.values()
    assert both.tokens == sum(part.tokens for part in parts)
    assert both.greedy_match == pytest.approx(sum(p.greedy_match for p in parts) / 2)
    assert min(p.kl for p in parts) <= both.kl <= max(p.kl for p in parts)


def test_compare_prints_and_writes_a_table_per_text(tmp_path, src, calib_text, eval_text):
    result = run("compare", src, "--experts", 3, "--calib", calib_text, "--eval",
                 f"{eval_text},{calib_text}", "--methods", "o-prune,ream", "--calib-samples", 2,
                 "--seq-len", 32, "--eval-seq-len", 32, "--eval-samples", 2,
                 "--csv", tmp_path / "r.csv")
    assert result.exit_code == 0, result.stderr
    assert f"### {eval_text.name}" in result.stdout and f"### {calib_text.name}" in result.stdout
    parts = result.stdout.split("\n\n")
    tables = [part for part in parts if part.startswith("| method")]
    assert len(tables) == 3  # all texts, then one per text under its heading
    assert parts.index(f"### {calib_text.name}") + 1 == parts.index(tables[2])
    for table in tables:
        rows = [line.split("|")[1].strip() for line in table.splitlines()
                if line.startswith("| ")][2:]
        assert rows == ["(original)", "o-prune", "ream"]
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [(row["method"], row["source"]) for row in table] == [
        (method, source) for method in ("o-prune", "ream")
        for source in ("all", eval_text.name, calib_text.name)]
    assert all(float(row["repetition"]) >= 0 for row in table)
