"""Options validated where they live, replayed from a recipe; checks before work; what the run
records (hcconvert.json, model card)."""

import json
from collections import namedtuple

import pytest
import torch
from checkpoints import save_tiny_mixtral
from cli_runs import assert_user_error, convert_args, run

import hcconvert
import hcconvert.pipeline.preflight
from hcconvert.errors import UserError
from hcconvert.pipeline.options import CHOICES, ConvertOptions, flag

# A bad value for every option, and what the one-line error must name besides the option.
BAD_VALUES = {
    "experts": (0, "at least 1"),
    "method": ("prunee", "merge, prune"),
    "grouping": ("hierarchy", "hierarchical, dominant"),
    "linkage": ("median", "average, single"),
    "merge": ("mean", "freq, average"),
    "router": ("top", "dominant, freq-avg, lse-fit"),
    "propagate": ("both", "original, merged"),
    "calib": (7, "text"),
    "calib_samples": (0, "at least 1"),
    "seq_len": (-5, "at least 1"),
    "seed": (-1, "at least 0"),
    "max_shard_size": (0, "at least 1"),
    "device": ("tpu", "auto, cpu, cuda"),
    "revision": (3, "text"),
    "metric": ("cosine", "output, router-logits"),
    "max_group_size": (0, "at least 1"),
    "prune_by": ("size", "frequency, output"),
    "saliency": ("reap", "ream, routed"),
    "similarity": ("euclid", "ream, cosine"),
    "layer_fit": ("yes", "true or false"),
    "compute_dtype": ("float16", "auto, float32, bfloat16"),
    "text_field": (3, "text"),
    "dtype": ("fp16", "source, bf16"),
    "max_gpu_memory": (0, "at least 1"),
}
# Options the command line can carry a bad value for (calib, revision and text_field are
# always text; --layer-fit is a switch).
CLI_BAD = [name for name in BAD_VALUES
           if name not in ("calib", "revision", "layer_fit", "text_field")]


def test_every_option_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f for f in ConvertOptions.__dataclass_fields__}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_python_api_refuses_bad_values(name):
    value, fragment = BAD_VALUES[name]
    with pytest.raises(UserError) as error:
        ConvertOptions(**{"experts": 3, name: value})
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{flag(name)} {value!r} is not valid") and fragment in message


@pytest.mark.parametrize("value", [True, 2.0, "3"])
def test_python_api_refuses_non_integers(value):
    with pytest.raises(UserError, match="--experts"):
        ConvertOptions(experts=value)


def test_path_calib_is_kept_as_text(calib_text):
    assert ConvertOptions(experts=3, calib=calib_text).calib == str(calib_text)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("options") / "src")


@pytest.mark.parametrize("name", CLI_BAD)
def test_cli_refuses_bad_values(src, tmp_path, name):
    value, fragment = BAD_VALUES[name]
    given = [] if name == "experts" else ["--experts", 3]
    result = run(src, *given, "--dry-run", flag(name), value)
    # click answers for the choices, ConvertOptions for the numbers: both one line, exit 2
    assert_user_error(result, flag(name))
    if name in CHOICES:
        assert all(choice in result.stderr for choice in CHOICES[name])
    else:
        assert fragment in result.stderr


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"hcconvert, version {hcconvert.__version__}\n"


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    """One conversion with non-default options, from a source whose card has a license."""
    from hcconvert.cli.demo import data_file

    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- moe\n---\n# tiny\n")
    out = tmp_path_factory.mktemp("converted") / "out"
    result = run(*convert_args(src, out, data_file("demo_calib.txt"), "--grouping", "kmeans",
                               "--router", "dominant", "--max-shard-size", "50KB"))
    assert result.exit_code == 0, result.stderr
    return out


def test_hcconvert_json_records_the_run(converted):
    record = json.loads((converted / "hcconvert.json").read_text())
    assert record["hcconvert_version"] == hcconvert.__version__
    assert record["environment"]["libraries"]["torch"] == torch.__version__
    assert record["options"]["grouping"] == "kmeans" and record["options"]["experts"] == 3
    assert record["calibration"]["samples"] == 2 and record["calibration"]["tokens"] == 64
    assert set(record["run"]) == {"device", "dtype", "kernel"}


def test_model_card_has_license_calibration_and_version(converted):
    card = (converted / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front.splitlines()
    assert f"hcconvert {hcconvert.__version__}" in card
    assert "Calibration: 2 samples (64 tokens) of up to 32 tokens from `demo_calib.txt`" in card


def test_recipe_replays_the_run(converted, src, tmp_path):
    replay = tmp_path / "replay"
    result = run("convert", "--recipe", converted / "hcconvert.json", src, "--out", replay)
    assert result.exit_code == 0, result.stderr
    original = json.loads((converted / "hcconvert.json").read_text())
    replayed = json.loads((replay / "hcconvert.json").read_text())
    assert replayed["options"] == original["options"]
    assert replayed["layers"] == original["layers"]
    for shard in converted.glob("*.safetensors"):
        assert (replay / shard.name).read_bytes() == shard.read_bytes()


def test_flags_given_override_the_recipe(tmp_path, src, calib_text):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"experts": 2, "method": "prune", "calib": str(calib_text),
                                  "calib_samples": 2, "seq_len": 32, "max_shard_size": "1MB"}))
    out = tmp_path / "out"
    result = run(src, "--recipe", recipe, "--experts", 4, "--seed", 7, "--out", out)
    assert result.exit_code == 0, result.stderr
    options = json.loads((out / "hcconvert.json").read_text())["options"]
    assert options == {**ConvertOptions(experts=4).to_json(), "method": "prune", "seed": 7,
                       "calib": str(calib_text), "calib_samples": 2, "seq_len": 32,
                       "max_shard_size": 10**6}


@pytest.mark.parametrize("content,fragment", [
    ('{"experts": 3, "methd": "prune"}', "unknown option 'methd'"),
    ('{"experts": 3, "method": "prunee"}', "--method 'prunee' is not valid"),
    ('{"experts": 3, "max_shard_size": "lots"}', "--max-shard-size 'lots'"),
    ('["experts", 3]', "not a JSON object of options"),
    ("{not json", "cannot read recipe"),
    ('{"method": "prune"}', "--experts is required"),
])
def test_bad_recipe(tmp_path, src, content, fragment):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(content)
    assert_user_error(run(src, "--recipe", recipe, "--dry-run"), fragment)


def test_missing_recipe(tmp_path, src):
    assert_user_error(run(src, "--recipe", tmp_path / "none.json", "--dry-run"),
                      "cannot read recipe")


@pytest.fixture
def full_disk(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hcconvert.pipeline.preflight.shutil, "disk_usage",
                        lambda path: usage(10**9, 10**9 - 1000, 1000))


def test_not_enough_disk(tmp_path, src, calib_text, full_disk):
    out = tmp_path / "out"
    for extra in ((), ("--dry-run",)):
        result = run(*convert_args(src, out, calib_text, *extra))
        assert_user_error(result, f"not enough disk at {tmp_path}")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_dry_run_fails_where_the_run_would(tmp_path, src, calib_text):
    no_tokenizer = save_tiny_mixtral(tmp_path / "src")
    (no_tokenizer / "tokenizer.json").unlink()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [((no_tokenizer, "--calib", calib_text), "tokenizer.json"),
             ((src, "--calib", tmp_path / "missing.txt"), "does not exist"),
             ((src, "--calib", calib_text, "--out", occupied), "pass --overwrite")]
    for args, fragment in cases:
        result = run(*args, "--experts", 3, "--dry-run")
        assert_user_error(result, fragment)
        assert "experts       6 -> 3" in result.stdout


def test_eval_calls_its_text_held_out(tmp_path, src):
    assert_user_error(run("eval", src, src, "--text", tmp_path / "none.txt"),
                      f"held-out file {tmp_path / 'none.txt'} does not exist")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    result = run("eval", src, src, "--text", short, "--seq-len", 64, "--samples", 2)
    assert_user_error(result, "held-out text short.txt has")  # refused, not a short sample
    assert "calibration" not in result.stderr


# --- what a new user tripped on (numbers beyond 64 bits, short contexts, paths) ---------------

@pytest.mark.parametrize("option", ["--experts", "--calib-samples", "--seq-len", "--seed",
                                    "--max-group-size", "--max-shard-size"])
def test_a_number_beyond_64_bits_is_one_line(src, tmp_path, option):
    result = run(*convert_args(src, tmp_path / "out", tmp_path / "c.txt"), option, 2**70)
    assert_user_error(result, "not valid")


@pytest.mark.parametrize("option", ["--seq-len", "--samples"])
def test_eval_numbers_beyond_64_bits_are_one_line(src, option):
    assert_user_error(run("eval", src, src, "--text", "t.txt", option, 2**70), "range")


def test_the_default_sequence_fits_a_short_context(tmp_path, calib_text):
    """max_position_embeddings below 2048: the default is capped to it (and said so) in the
    dry run and the run alike; an explicit longer --seq-len is refused by both."""
    short = save_tiny_mixtral(tmp_path / "short", max_position_embeddings=64)
    dry = run(short, "--experts", 3, "--calib", calib_text, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "x 64 tokens" in dry.stdout and "max_position_embeddings" in dry.stderr
    out = tmp_path / "out"
    done = run(short, "--experts", 3, "--calib", calib_text, "--calib-samples", 2, "--out", out)
    assert done.exit_code == 0, done.stderr
    assert json.loads((out / "hcconvert.json").read_text())["options"]["seq_len"] == 64
    for extra in (("--dry-run",), ("--out", tmp_path / "out2")):
        assert_user_error(run(short, "--experts", 3, "--calib", calib_text, "--seq-len", 128,
                              *extra), "max_position_embeddings (64); give at most 64")


def test_too_little_calibration_for_the_fit_is_said_in_the_dry_run_and_the_run(
        tmp_path, src, calib_text):
    """auto's layer fit needs layerfit.MIN_FIT_TOKENS per kept expert: below it both say
    so once, and the run keeps every layer's unfitted reduction."""
    args = (src, "--experts", 3, "--calib", calib_text, "--calib-samples", 4, "--seq-len", 64)
    dry, done = run(*args, "--dry-run"), run(*args, "--out", tmp_path / "out")
    for result in (dry, done):
        assert result.exit_code == 0, result.stderr
        assert result.stderr.count("fit tokens per kept expert, fewer than the 512") == 1
    layers = json.loads((tmp_path / "out" / "hcconvert.json").read_text())["layers"]
    assert all(not entry["layer_fit"]["fitted"] for entry in layers)


def test_dry_run_counts_the_samples_the_text_gives(tmp_path, src):
    few = tmp_path / "few.txt"
    few.write_text("a short text " * 40)
    result = run(src, "--experts", 3, "--calib", few, "--seq-len", 64, "--dry-run")
    assert result.exit_code == 0, result.stderr
    # 520 bytes of byte-level tokens and BOS: 8 samples of 64
    assert "calibration   8 x 64 tokens (the text gives 8 of the 32 asked for)" in result.stdout


@pytest.mark.parametrize("option,value,fragment", [
    ("--router", "lse-fit", "fits softmax mass"),
    ("--max-group-size", "1", "cannot hold"),
])
def test_dry_run_refuses_what_the_run_refuses(tmp_path, calib_text, option, value, fragment):
    """Each refusal of options against the model by a merging method, in the dry run and
    the run."""
    from family_models import CASES, save_family_model

    sigmoid = save_family_model(CASES["deepseek_v3"], tmp_path / "src")
    args = (sigmoid, "--experts", CASES["deepseek_v3"].reduce_to, "--calib", calib_text,
            "--method", "hc-smoe", option, value)
    assert_user_error(run(*args, "--dry-run"), fragment)
    assert_user_error(run(*args, "--out", tmp_path / "out"), fragment)


def test_the_recipe_names_its_source_and_paths_absolute(converted, tmp_path, monkeypatch):
    """hcconvert.json records SRC and --calib by absolute path: --recipe replays from another
    directory, and without SRC it takes the recipe's."""
    record = json.loads((converted / "hcconvert.json").read_text())
    assert record["source"].startswith("/") and record["options"]["calib"].startswith("/")
    monkeypatch.chdir(tmp_path)
    result = run("convert", "--recipe", converted / "hcconvert.json", "--out", "replay")
    assert result.exit_code == 0, result.stderr
    for shard in converted.glob("*.safetensors"):
        assert (tmp_path / "replay" / shard.name).read_bytes() == shard.read_bytes()


def test_the_model_cards_command_repeats_the_run(converted, tmp_path):
    """The command in the model card, run as it is, writes the same bytes."""
    import shlex

    card = (converted / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("hcconvert "))
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    for shard in converted.glob("*.safetensors"):
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()
