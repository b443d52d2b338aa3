"""Resume: a run killed anywhere (after a layer, in the middle of a shard, while publishing)
goes on from its first unfinished layer and writes the same bytes as a run never stopped.

The killed runs are subprocesses that kill themselves at a named point
(HCCONVERT_TEST_KILL_AT, resume.kill_point); the references and the resumed runs go through
the CLI in-process.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_mixtral, tree_digest
from cli_runs import CLI, assert_one_error_line
from click.testing import CliRunner
from family_models import CASES, add_mtp_layer, save_family_model

from hcconvert.cli.main import main
from hcconvert.io.durable import KILL_AT_VARIABLE, KILL_SIGNAL_VARIABLE
from hcconvert.io.staging import STATE_FILE
from hcconvert.io.tensors import SAFETENSORS_DTYPES, OutputTensor
from hcconvert.io.writer import ShardWriter

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("pristine") / "src")


@pytest.fixture
def workspace(tmp_path, pristine, calib_text) -> Path:
    """src/ and calib.txt in a directory of their own, where out/ and its staging go."""
    shutil.copytree(pristine, tmp_path / "src")
    shutil.copy(calib_text, tmp_path / "calib.txt")
    return tmp_path


def args_for(workspace: Path, *extra, src="src", experts=3) -> list[str]:
    return [str(a) for a in (workspace / src, "--experts", experts, "--out", workspace / "out",
                             "--calib", workspace / "calib.txt", "--calib-samples", 3,
                             "--seq-len", 32, "--max-shard-size", "40KB", *extra)]


def run_in_process(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    return result


def reference(workspace: Path, args: list[str]) -> dict[str, str]:
    """The digests of an uninterrupted run's output (made in a directory of its own, since
    the output records --out's name)."""
    other = workspace / "reference"
    other.mkdir()
    run_in_process([a.replace(str(workspace / "out"), str(other / "out")) for a in args])
    return tree_digest(other / "out")


def killed(workspace: Path, args: list[str], point: str, signum: str = "SIGKILL"):
    """Run the CLI in a subprocess that stops itself at point; returns (exit code, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", KILL_AT_VARIABLE: point,
           KILL_SIGNAL_VARIABLE: signum}
    process = subprocess.run([*CLI, *args], cwd=workspace, env=env, text=True,
                             capture_output=True, timeout=300)
    return process.returncode, process.stderr


def staging_dirs(workspace: Path) -> list[Path]:
    return sorted(workspace.glob(".out.hcconvert-tmp-*"))


def tensor_count(digests_from: Path) -> int:
    return len(json.loads((digests_from / INDEX).read_text())["weight_map"])


@pytest.mark.parametrize("method,point", [
    ("merge", "commit:0"),  # after the first layer's checkpoint
    ("prune", "tensor:-4"),  # in the middle of the last layer, mid-shard (from the end)
    ("auto", "commit:1"),  # every layer done, before the metadata
    ("merge", "publish"),  # with an old --out moved aside, before the new one moves in
])
def test_killed_run_resumes_to_the_same_bytes(workspace, method, point):
    overwrite = ("--overwrite",) if point == "publish" else ()
    args = args_for(workspace, "--method", method, *overwrite)
    expected = reference(workspace, args)
    if point.startswith("tensor:"):
        point = f"tensor:{tensor_count(workspace / 'reference' / 'out') + int(point[7:])}"
    if overwrite:
        (workspace / "out").mkdir()
        (workspace / "out" / "old.txt").write_text("the previous output")

    code, stderr = killed(workspace, args, point)
    assert code == -signal.SIGKILL, stderr
    (staging,) = staging_dirs(workspace)
    assert (staging / STATE_FILE).is_file()
    if point == "publish":
        assert not (workspace / "out").exists()  # moved aside: restored by the next run

    result = run_in_process(args)
    assert "resuming: " in result.stderr
    assert tree_digest(workspace / "out") == expected
    assert sorted(os.listdir(workspace)) == ["calib.txt", "out", "reference", "src"]


def test_mtp_family_resumes_at_its_mtp_layer(tmp_path, calib_text):
    """glm4_moe with an MTP layer, killed once every decoder layer is done: the resumed run
    feeds the MTP layer from the saved states after the last decoder layer."""
    case = CASES["glm4_moe"]
    src = save_family_model(case, tmp_path / "src")
    mtp = add_mtp_layer(src, with_copies=False)
    shutil.copy(calib_text, tmp_path / "calib.txt")
    args = args_for(tmp_path, "--method", "merge", experts=case.reduce_to)
    expected = reference(tmp_path, args)
    code, stderr = killed(tmp_path, args, f"commit:{mtp - 1}")
    assert code == -signal.SIGKILL, stderr
    run_in_process(args)
    assert tree_digest(tmp_path / "out") == expected


def test_run_with_other_options_reports_the_stale_staging_and_leaves_it(workspace):
    merge = args_for(workspace, "--method", "merge")
    code, _ = killed(workspace, merge, "commit:0")
    assert code == -signal.SIGKILL
    (stale,) = staging_dirs(workspace)
    stale_files = tree_digest(stale)

    prune = args_for(workspace, "--method", "prune")
    expected = reference(workspace, prune)
    result = run_in_process(prune)
    assert "resuming" not in result.stderr
    assert f"warning: {stale} was left by an interrupted run (1 layers of a run with other " \
        "options (method)); it is not reused" in result.stderr
    assert tree_digest(workspace / "out") == expected
    assert tree_digest(stale) == stale_files

    shutil.rmtree(workspace / "out")
    assert "resuming: 1 of 2 layers" in run_in_process(merge).stderr  # still resumable
    assert staging_dirs(workspace) == []


def test_no_resume_starts_over(workspace):
    args = args_for(workspace)
    expected = reference(workspace, args)
    killed(workspace, args, "commit:0")
    result = run_in_process([*args, "--no-resume"])
    assert "resuming" not in result.stderr
    assert tree_digest(workspace / "out") == expected


def test_sigterm_with_resume_keeps_the_finished_layers(workspace):
    args = args_for(workspace, "--resume")
    expected = reference(workspace, args)
    code, stderr = killed(workspace, args, "commit:0", "SIGTERM")
    assert_one_error_line(code, stderr, "interrupted by SIGTERM; nothing was published; the "
                          "finished layers are kept in", 128 + signal.SIGTERM)
    assert not (workspace / "out").exists()
    result = run_in_process(args)
    assert "resuming: 1 of 2 layers" in result.stderr
    assert tree_digest(workspace / "out") == expected


def test_sigterm_without_resume_cleans_up(workspace):
    code, stderr = killed(workspace, args_for(workspace), "commit:0", "SIGTERM")
    assert_one_error_line(code, stderr, "interrupted by SIGTERM; nothing was published",
                          128 + signal.SIGTERM)
    assert "finished layers are kept" not in stderr
    assert sorted(os.listdir(workspace)) == ["calib.txt", "src"]


def test_shard_writer_resumes_mid_shard(tmp_path):
    """Bytes past the checkpoint (a killed run wrote on) are cut, later shards removed."""
    tensors = [OutputTensor(f"t{i}", SAFETENSORS_DTYPES[torch.float32], (4, 8))
               for i in range(7)]
    values = [torch.full((4, 8), float(i)) for i in range(7)]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for directory in (whole, resumed):
        directory.mkdir()
    with ShardWriter(whole, tensors, 3 * 128) as writer:
        for tensor, value in zip(tensors, values, strict=True):
            writer.write(tensor.name, value)
    # The killed run wrote every tensor (not the index); its last checkpoint said 4 written.
    with pytest.raises(KeyboardInterrupt), ShardWriter(resumed, tensors, 3 * 128) as writer:
        for tensor, value in zip(tensors, values, strict=True):
            writer.write(tensor.name, value)
        raise KeyboardInterrupt
    with ShardWriter(resumed, tensors, 3 * 128, position=4) as writer:
        for tensor, value in zip(tensors[4:], values[4:], strict=True):
            writer.write(tensor.name, value)
    assert tree_digest(resumed) == tree_digest(whole)


def test_checkpoint_saves_the_states_of_its_layer(tmp_path):
    """A layer's checkpoint holds the hidden (and carried) states as the layer left them,
    though the next layer changes them in place before the writer's thread commits it."""
    from types import SimpleNamespace

    from hcconvert.io.staging import RunState, read_state
    from hcconvert.pipeline.resume import Progress, load_hidden

    hidden, carried = torch.randn(6, 4), torch.randn(2, 3)
    stream = SimpleNamespace(hidden=hidden.clone(), state={0: carried.clone(), 3: None})
    writer = SimpleNamespace(position=5, sync=lambda: None)
    progress = Progress(tmp_path, RunState({"run": 1}, "digest"))
    commit = progress.layer_done(2, stream, writer, [], 5, last=False)
    stream.hidden.mul_(-1)  # the next layer, before the commit runs
    stream.state[0].add_(1)
    commit()
    state = read_state(tmp_path)
    assert (state.finished, state.writer_position) == (3, 5)
    saved, saved_carried = load_hidden(tmp_path, state.hidden)
    assert torch.equal(saved, hidden) and list(saved_carried) == [0]
    assert torch.equal(saved_carried[0], carried)
