"""Long greedy continuations (eval/greedy.py): the KV-cached streamed generation writes what
the model's own full forward picks at every step, for every family's kind of attention and
cache; the n-gram scores; and a reduced model made to loop scores visibly worse than a healthy
one in `hcconvert eval`."""

import shutil

import pytest
import torch
from checkpoints import rewrite_tensor, save_tiny_mixtral
from family_models import CASES, save_family_model

from hcconvert.eval import greedy
from hcconvert.eval.evaluate import evaluate_many
from hcconvert.eval.streamed import CheckpointLayers, StreamedModel, stream_side_by_side
from hcconvert.model.spec import open_source
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", list(CASES))
def test_each_cached_step_picks_the_full_forwards_argmax(tmp_path, monkeypatch, name):
    """Teacher-forced over the continuation, the model's full forward (no cache) gives each
    position's logits from the whole prefix: the cached step's token must be their argmax
    (within rounding of a near tie). The first layer is kept built between steps, the others
    read again each step. Families without a cached step (Family.cached_generation: their
    cached step failed this test) recompute the sequence each step, and hold to it too."""
    src = save_family_model(CASES[name], tmp_path / "m")
    ckpt, spec = open_source(str(src))
    layers = CheckpointLayers(ckpt, spec, CPU)
    monkeypatch.setattr(greedy, "KEEP_BYTES", greedy.held_bytes(layers.module(0)))
    prompts = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    continued = greedy.greedy_continuation(layers, prompts, steps=5, progress=False)
    assert continued.shape == (2, 14) and torch.equal(continued[:, :9], prompts)
    full = StreamedModel(ckpt, spec, continued, CPU)
    stream_side_by_side([full], lambda layers: layers)
    for row in range(2):
        logits = full.log_probs(row)[8:-1]  # the positions that chose tokens 9..13
        chosen = logits.gather(1, continued[row, 9:, None]).squeeze(1)
        torch.testing.assert_close(chosen, logits.max(-1).values, atol=1e-4, rtol=0)


def test_the_recomputed_continuation_writes_what_the_cached_one_writes(tmp_path):
    """The path of families without a cached step gives a cached family's tokens."""
    ckpt, spec = open_source(str(save_family_model(CASES["mixtral"], tmp_path / "m")))
    prompts = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    cached = greedy.greedy_continuation(CheckpointLayers(ckpt, spec, CPU), prompts, steps=4,
                                        progress=False)
    recomputed = greedy.recomputed_continuation(CheckpointLayers(ckpt, spec, CPU), prompts, 4,
                                                progress=False)
    assert torch.equal(cached, recomputed)


def test_repeated_and_distinct_ngrams():
    loop = torch.tensor([7, 8, 9] * 10)
    assert greedy.repeated_share(loop) == pytest.approx(1 - 3 / 27)  # 3 distinct of 27 4-grams
    assert greedy.repeated_share(torch.arange(30)) == 0
    assert greedy.distinct_share([loop]) == pytest.approx(3 / 29)
    assert greedy.distinct_share([torch.arange(5), torch.arange(5)]) == pytest.approx(4 / 8)


def test_matched_length_counts_only_the_leading_run():
    reference = torch.tensor([[5, 1, 2, 3, 4]])  # one prompt token, then 4 generated
    continued = torch.tensor([[5, 1, 2, 0, 4]])  # right, right, wrong, right (after a miss)
    assert greedy.matched_lengths(continued, reference, steps=4).tolist() == [2]


@pytest.fixture(scope="module")
def healthy_and_looping(tmp_path_factory):
    """The original, a mild reduction of it, and the same reduction made to loop: its token
    embeddings scaled so far up that the layers' contributions vanish beside them, so each
    next token depends on the current one alone (a map of the vocabulary to itself, which a
    greedy walk soon repeats)."""
    from hcconvert.cli.demo import data_file

    root = tmp_path_factory.mktemp("loop")
    src = save_tiny_mixtral(root / "src")
    convert(str(src), root / "healthy", ConvertOptions(
        experts=5, method="hc-smoe", calib=str(data_file("demo_calib.txt")), calib_samples=4,
        seq_len=64), progress=False)
    shutil.copytree(root / "healthy", root / "looping")
    rewrite_tensor(root / "looping", "model.embed_tokens.weight", lambda w: w * 1e4)
    return src, root / "healthy", root / "looping"


def test_a_looping_model_scores_visibly_worse_than_a_healthy_one(healthy_and_looping,
                                                                  eval_text):
    src, healthy, looping = healthy_and_looping
    good, bad = evaluate_many(str(src), [str(healthy), str(looping)], eval_text, seq_len=80,
                              samples=8, progress=False)
    assert bad.repetition > 0.8 and bad.repetition > good.repetition + 0.2
    assert bad.distinct < good.distinct / 2
    assert bad.generated_perplexity > 1.2 * good.generated_perplexity
    assert bad.greedy_match < good.greedy_match
    # The original's own continuations are the reference both are read against.
    assert good.repetition_original == bad.repetition_original
    assert good.generated_perplexity_original == bad.generated_perplexity_original


def test_the_original_scores_itself_as_it_writes(healthy_and_looping, eval_text):
    src, _, _ = healthy_and_looping
    (same,) = evaluate_many(str(src), [str(src)], eval_text, seq_len=32, samples=2,
                            progress=False)
    assert same.greedy_match == greedy.CONTINUATION_TOKENS
    assert same.repetition == same.repetition_original
    assert same.distinct == same.distinct_original
    assert same.generated_perplexity == same.generated_perplexity_original


def test_transformers_generate_writes_what_eval_scored(healthy_and_looping):
    """lm-evaluation-harness's `hf` model loads an output with AutoTokenizer and
    AutoModelForCausalLM: both load, and transformers' own greedy generate (KV cache
    included) writes the continuation hcconvert eval streamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, healthy, _ = healthy_and_looping
    tokenizer = AutoTokenizer.from_pretrained(healthy)
    prompts = tokenizer(["The experts of a mixture", "Merging experts, greedy!"],  # same length
                        return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(healthy, dtype=torch.float32)
    theirs = model.generate(prompts, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    ours = greedy.greedy_continuation(CheckpointLayers(*open_source(str(healthy)), CPU),
                                      prompts, steps=24, progress=False)
    assert torch.equal(theirs, ours)
