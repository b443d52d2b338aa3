"""Resuming a killed conversion from its first unfinished layer, with the same bytes as a run
that was never stopped.

A conversion with one output stages into a directory named after its run key (a hash of the
source, the options and hcconvert's version), beside --out and under its lock:

    .OUT.hcconvert-tmp-KEY/
        output/               what is published to --out: shards, then config and metadata
        state.json            the last finished layer (RunState), replaced atomically
        hidden-LLLLL.safetensors   the calibration hidden states after layer LLLLL

After each layer the pipeline saves the hidden states (main thread), then, once the layer's
tensors are on disk (writer thread), syncs the shard and replaces state.json. A run killed at
any point finds its key's directory, truncates the open shard to the recorded position and
goes on from the next layer; everything else a layer needs is recomputed exactly from the
source (the embeddings, the masks, the MTP layer's next-token inputs) and every seed is per
layer (seed + layer), so no layer depends on the ones before it having run in this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from ..io.durable import kill_point
from ..io.source import Checkpoint, is_hub_id
from ..io.staging import STATE_FILE, RunState, read_state, write_state
from .options import ConvertOptions

if TYPE_CHECKING:
    from ..io.writer import ShardWriter
    from ..model.decoder import HiddenStream
    from .records import LayerResult


def run_key(source: str, options: ConvertOptions, fingerprint: dict) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {"hcconvert": __version__, "source": source, "options": options.to_json(),
            "checkpoint": fingerprint}


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def hidden_file(layer: int) -> str:
    return f"hidden-{layer:05d}.safetensors"


def save_hidden(directory: Path, layer: int, hidden: torch.Tensor,
                carried: dict[int, torch.Tensor | None]) -> str:
    """The stream's states after layer (and the state a family's layers hand the next one, per
    batch), saved atomically; returns the file's name."""
    tensors = {"hidden": hidden.detach().cpu().contiguous()}
    tensors.update({f"carried.{start}": t.detach().cpu().contiguous()
                    for start, t in carried.items() if t is not None})
    name = hidden_file(layer)
    temporary = directory / (name + ".partial")
    save_file(tensors, str(temporary))
    with open(temporary, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temporary, directory / name)
    return name


def load_hidden(directory: Path, name: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The states save_hidden saved: the hidden states and the carried state by batch start."""
    try:
        tensors = load_file(str(directory / name))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot resume from {directory}: {name} is unreadable ({err}); "
                        "pass --no-resume to start over") from None
    carried = {int(k.removeprefix("carried.")): t for k, t in tensors.items()
               if k.startswith("carried.")}
    return tensors["hidden"], carried


def remove_other_hidden(directory: Path, keep: str | None) -> None:
    """Hidden states of layers before the last finished one: no longer needed."""
    for path in directory.glob("hidden-*.safetensors*"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def checkpoint_fingerprint(source: str, ckpt: Checkpoint) -> dict:
    """The source as this run reads it: config and tensor headers, and the shard files (size
    and modification time of a local directory's; a Hub snapshot is named by its commit)."""
    tensors = sorted((name, info.shard, info.dtype, list(info.shape))
                     for name, info in ckpt.tensors.items())
    digest = hashlib.sha256(json.dumps([ckpt.config, tensors], sort_keys=True).encode())
    if is_hub_id(source):
        files: dict = {"commit": ckpt.root.name}
    else:
        shards = sorted({info.shard for info in ckpt.tensors.values()})
        files = {shard: [(stat := (ckpt.root / shard).stat()).st_size, stat.st_mtime_ns]
                 for shard in shards}
    return {"headers": digest.hexdigest(), "files": files}


def source_identity(source: str) -> str:
    """A local source by its absolute path (a relative one depends on the working directory),
    a Hub repo by its id."""
    return source if is_hub_id(source) else str(Path(source).resolve())


class Progress:
    """A resumable run's state in its staging directory (module docstring): what a resumed run
    restores, and the checkpoint after each layer."""

    def __init__(self, directory: Path, state: RunState):
        self.directory, self.state = directory, state

    @property
    def finished(self) -> int:
        return self.state.finished

    def results(self) -> list[LayerResult]:
        """The interrupted run's recorded layers (for hcconvert.json and the model card)."""
        from .records import LayerResult

        return [LayerResult(**entry) for entry in self.state.layers]

    def restore(self, stream: HiddenStream) -> None:
        """The hidden states (and carried state) after the last finished layer into stream."""
        hidden, carried = load_hidden(self.directory, self.state.hidden)
        stream.hidden.copy_(hidden.to(stream.hidden.device))
        stream.state.update({start: t.to(stream.hidden.device) for start, t in carried.items()})

    def layer_done(self, layer: int, stream: HiddenStream, writer: ShardWriter,
                   results: list[LayerResult], position: int, last: bool) -> Callable[[], None]:
        """Save the hidden states after layer now (the next layer changes them in place);
        return the job that records the layer once the writer has written its `position`
        tensors (it runs after the layer's writes, on the writer's thread)."""
        hidden = None if last else save_hidden(self.directory, layer, stream.hidden,
                                               stream.state)
        layers = [dataclasses.asdict(result) for result in results]

        def commit() -> None:
            if writer.position != position:
                raise RuntimeError(f"layer {layer} checkpoint at tensor {writer.position}, "
                                   f"planned {position}")
            writer.sync()
            self.state = dataclasses.replace(self.state, finished=layer + 1, layers=layers,
                                             writer_position=position, hidden=hidden)
            write_state(self.directory, self.state)
            remove_other_hidden(self.directory, hidden)
            kill_point(f"commit:{layer}")
        return commit


def open_progress(output: Path, key: dict, tokens: torch.Tensor, layers: int) -> Progress:
    """The state of the staging directory that holds output (StagedOutput): resumed when an
    interrupted run with the same key and calibration tokens left one, else a fresh start."""
    directory = output.parent
    digest = tokens_digest(tokens)
    state = read_state(directory)
    if state is not None and (state.key != key or state.tokens_sha256 != digest):
        print(f"warning: {directory} holds a run with other calibration tokens (the text "
              "has changed); starting over", file=sys.stderr)
        state = None
    if state is None:
        clear_state(directory, output)
        return Progress(directory, RunState(key, digest))
    print(f"resuming: {state.finished} of {layers} layers were finished by an interrupted "
          f"run ({directory})", file=sys.stderr)
    return Progress(directory, state)


def clear_state(directory: Path, output: Path) -> None:
    """A fresh start in a staging directory: no state, no hidden states, no output files."""
    (directory / STATE_FILE).unlink(missing_ok=True)
    remove_other_hidden(directory, None)
    for path in output.iterdir():
        path.unlink()
