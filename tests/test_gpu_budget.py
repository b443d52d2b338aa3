"""--max-gpu-memory: a MoE layer's experts come to the compute device in chunks that fit the
budget (here the CPU stands in for the GPU), with the same output bytes as without a budget."""

import pytest
import torch
from checkpoints import save_tiny_mixtral, tree_digest
from cli_runs import assert_user_error, convert_args, run

import hcconvert.model.experts
from hcconvert.model.spec import open_source
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.estimate import layer_budget, moe_layer_values
from hcconvert.pipeline.options import ConvertOptions

CALIBRATION = dict(calib_samples=2, seq_len=32)


def budget_for(src, options: ConvertOptions, chunk: int) -> int:
    """The budget under which the pipeline brings `chunk` experts at a time."""
    _, spec = open_source(str(src))
    whole = layer_budget(spec, options, torch.float32, moe_layer_values(spec), False, None,
                         gpu=True)
    return whole.fixed + 2 * chunk * whole.expert


def shard_bytes(directory) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(directory).items()
            if name.endswith(".safetensors")}


@pytest.mark.parametrize("method", [
    {"method": "merge", "merge": "mergemoe"},
    {"method": "merge", "merge": "fix-dom", "metric": "weights", "propagate": "merged"},
    {"method": "prune", "prune_by": "output"},
    {"method": "auto"},
])
def test_a_tiny_budget_gives_the_same_bytes(tmp_path, calib_text, monkeypatch, method):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(experts=3, calib=str(calib_text), **CALIBRATION, **method)
    convert(str(src), tmp_path / "unlimited", options, progress=False)
    gathered = []  # experts per copy to the device: the budget must have been honoured

    def spy(stacked, indices, device):
        gathered.append(len(indices))
        return gather(stacked, indices, device)

    gather = hcconvert.model.experts._gather
    monkeypatch.setattr(hcconvert.model.experts, "_gather", spy)
    tiny = ConvertOptions(**{**options.to_json(),
                             "max_gpu_memory": budget_for(src, options, chunk=1)})
    convert(str(src), tmp_path / "chunked", tiny, progress=False)
    # One expert per chunk; the neuron matcher compares two at once (two chunks' worth).
    assert gathered and max(gathered) <= 2
    assert shard_bytes(tmp_path / "chunked") == shard_bytes(tmp_path / "unlimited")


def test_a_budget_that_holds_the_layer_keeps_it_on_the_device(tmp_path, calib_text,
                                                              monkeypatch):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(experts=3, calib=str(calib_text), **CALIBRATION, method="merge")
    monkeypatch.setattr(hcconvert.model.experts, "_gather", None)  # never called
    roomy = ConvertOptions(**{**options.to_json(),
                              "max_gpu_memory": budget_for(src, options, chunk=9)})
    convert(str(src), tmp_path / "out", roomy, progress=False)


def test_a_budget_below_two_experts_is_one_line_before_any_work(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(experts=3, **CALIBRATION)
    budget = budget_for(src, options, chunk=1) - 1
    result = run(*convert_args(src, tmp_path / "out", calib_text, "--max-gpu-memory", budget))
    assert_user_error(result, "--max-gpu-memory")
    assert "is too small" in result.stderr and not (tmp_path / "out").exists()
    dry = run(*convert_args(src, tmp_path / "out", calib_text, "--max-gpu-memory", budget),
              "--dry-run")
    assert_user_error(dry, "--max-gpu-memory")
    assert "is too small" in dry.stderr and not (tmp_path / "out").exists()
    # one byte more is enough for both, the run's chunks counted as the dry run counts them
    for extra in ("--dry-run",), ():
        enough = run(*convert_args(src, tmp_path / "out", calib_text, "--max-gpu-memory",
                                   budget + 1), *extra)
        assert enough.exit_code == 0, enough.output


def test_a_malformed_budget_is_one_line(tmp_path, calib_text):
    # A budget below 1 byte is refused with every other option (test_options.BAD_VALUES).
    src = save_tiny_mixtral(tmp_path / "src")
    result = run(*convert_args(src, tmp_path / "out", calib_text, "--max-gpu-memory", "lots"))
    assert_user_error(result, "is not a size like 5GB")


def test_dry_run_prints_the_budget_and_its_chunks(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(experts=3, **CALIBRATION)
    # The dry run estimates a GPU run: bf16 weights would compute in bf16, fp32 ones in fp32.
    budget = budget_for(src, options, chunk=2)
    result = run(src, "--experts", 3, "--dry-run", "--calib", calib_text, "--calib-samples", 2,
                 "--seq-len", 32, "--max-gpu-memory", budget)
    assert result.exit_code == 0, result.stderr
    assert "at most 2 of 6 per chunk" in result.stdout
    unlimited = run(src, "--experts", 3, "--dry-run", "--calib", calib_text)
    if torch.cuda.is_available():
        assert "experts all on the GPU" in unlimited.stdout
    else:  # no GPU, no --max-gpu-memory: no budget to speak of
        assert "gpu budget" not in unlimited.stdout
