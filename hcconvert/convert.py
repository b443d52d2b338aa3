"""The conversion pipeline, one decoder layer at a time: read, calibrate, cluster, merge, write.

Per layer: attention with the original weights; for a MoE layer, statistics over all calibration
tokens, then each output's grouping, merging and router reduction (reduction.py); then the next
layer's input (the original layer's output, as in the paper, or the merged layer's with
--propagate merged). Only the calibration hidden states stay resident; a layer's weights are
freed before the next is read. With the original outputs propagated, several reductions share
one pass (convert_many): each layer's statistics are computed once and feed every output.
T tokens, H hidden, E experts, R groups.
"""

from __future__ import annotations

import functools
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from .alignment import NeuronMatcher
from .calibration import load_calibration
from .errors import UserError
from .families import family_for
from .metadata import write_metadata
from .modeling import (
    Experts,
    add_residual,
    attention_residual,
    dense_mlp,
    ffn_input,
    moe_block,
    start_stream,
)
from .options import ConvertOptions
from .plan import build_plan
from .reduction import Conversion, LayerResult, Reducer
from .resources import StageTimer
from .source import Checkpoint, resolve_source
from .spec import ModelSpec
from .statistics import collect_layer_stats
from .streaming import BackgroundWriter, prefetched_layers
from .writer import ShardWriter, check_output_dir, copy_side_files, publish, staging_dir

__all__ = ["Conversion", "LayerResult", "LayerPipeline", "convert", "convert_many"]


def open_source(src: str, revision: str | None = None) -> tuple[Checkpoint, ModelSpec]:
    ckpt = Checkpoint(resolve_source(src, revision))
    return ckpt, ModelSpec.from_config(ckpt.config, family_for(ckpt.config))


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def convert(src: str, out: Path, options: ConvertOptions, overwrite: bool = False,
            progress: bool = True) -> Conversion:
    """Convert SRC into a reduced checkpoint at OUT; nothing appears at OUT unless it succeeds."""
    return convert_many(src, [(out, options)], overwrite, progress)[0]


def convert_many(src: str, outputs: list[tuple[Path, ConvertOptions]], overwrite: bool = False,
                 progress: bool = True) -> list[Conversion]:
    """Several reductions of SRC from one pass over its layers, each into its own directory
    (its own shards, staging directory and hcconvert.json). They must share the calibration
    options; with more than one, all must propagate the original outputs, since merged
    propagation gives each its own hidden states. Nothing appears unless all succeed."""
    check_shareable([options for _, options in outputs])
    if len({out.resolve() for out, _ in outputs}) < len(outputs):
        raise ValueError("every output needs its own directory")
    first = outputs[0][1]
    ckpt, spec = open_source(src, first.revision)
    conversions = [prepare_output(src, ckpt, spec, out, options, overwrite)
                   for out, options in outputs]
    device = pick_device(first.device)
    tokens = load_calibration(ckpt.root, first.calib, first.calib_samples, first.seq_len,
                              first.seed)
    stagings = [staging_dir(out) for out, _ in outputs]
    try:
        reducers = run_pass(ckpt, spec, device, tokens, conversions, outputs, stagings, progress)
        for reducer, staging in zip(reducers, stagings, strict=True):
            copy_side_files(ckpt.root, staging)
            write_metadata(staging, ckpt, reducer.conversion, reducer.options)
        for staging, (out, _) in zip(stagings, outputs, strict=True):
            publish(staging, out)
    except BaseException:
        for staging in stagings:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return conversions


def run_pass(ckpt: Checkpoint, spec: ModelSpec, device: torch.device, tokens: torch.Tensor,
             conversions: list[Conversion], outputs: list[tuple[Path, ConvertOptions]],
             stagings: list[Path], progress: bool) -> list[Reducer]:
    """One pass over the layers writing every output's shards into its staging directory."""
    with ExitStack() as writers:
        reducers = [Reducer(conversion, options, writers.enter_context(
                        ShardWriter(staging, conversion.plan.outputs, options.max_shard_size)))
                    for conversion, (_, options), staging
                    in zip(conversions, outputs, stagings, strict=True)]
        LayerPipeline(ckpt, spec, device, reducers, outputs[0][1].seed).run(tokens, progress)
    return reducers


def check_shareable(options: list[ConvertOptions]) -> None:
    """Programming errors in a caller of convert_many (the CLI never builds such a list)."""
    if not options:
        raise ValueError("convert_many needs at least one output")
    if len({o.calibration_key() for o in options}) > 1:
        raise ValueError("outputs that share a pass must share the calibration options")
    if len(options) > 1 and any(o.propagate == "merged" for o in options):
        raise ValueError("--propagate merged gives each output its own pass")


def prepare_output(src: str, ckpt: Checkpoint, spec: ModelSpec, out: Path,
                   options: ConvertOptions, overwrite: bool) -> Conversion:
    """Plan one output and check its options against the model before any weight is read."""
    plan = build_plan(ckpt, spec, options.experts)
    check_output_dir(out, ckpt.root, overwrite)
    size = options.max_group_size
    merges = options.method in ("merge", "auto")  # auto tries a merging candidate too
    if merges and size is not None and options.experts * size < spec.num_experts:
        raise UserError(f"--max-group-size {size}: {options.experts} groups of at most {size} "
                        f"cannot hold {spec.num_experts} experts")
    return Conversion(src, out, plan)


class LayerPipeline:
    """Streams the checkpoint through the calibration hidden states, layer by layer, feeding
    every reducer; each MoE layer's statistics are collected once, for all of them."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, device: torch.device,
                 reducers: list[Reducer], seed: int):
        self.ckpt, self.spec, self.device, self.reducers = ckpt, spec, device, reducers
        self.seed = seed
        self.needs = frozenset().union(*(r.needs for r in reducers))
        # The reducer whose output feeds the next layer (--propagate merged), if any.
        self.propagator = next((r for r in reducers if r.options.propagate == "merged"), None)
        self.timer = StageTimer()  # the shared stages, credited to every conversion at the end
        self.dtype = torch.float32  # the compute dtype, set by run from the embedding's

    def run(self, tokens: torch.Tensor, progress: bool) -> None:
        with self.timer.stage("read"):  # once, for every output
            globals_ = self.ckpt.read([t.name for t in self.reducers[0].plan.global_outputs])
        table = globals_["model.embed_tokens.weight"]
        hidden, rope, self.dtype = start_stream(self.spec, table, tokens, self.device)
        for reducer in self.reducers:
            reducer.write_globals(globals_)
        del globals_, table
        bar = tqdm(total=self.spec.num_layers, desc="layers", unit="layer",
                   disable=not progress, file=sys.stderr)
        layers = prefetched_layers(self.ckpt, self.spec.num_layers,
                                   pin=self.device.type == "cuda")
        with BackgroundWriter() as background, bar:
            for _ in range(self.spec.num_layers):
                bar.set_postfix_str(f"layer {bar.n + 1}/{self.spec.num_layers}: reading")
                with self.timer.stage("read"):  # time spent waiting for the prefetch
                    layer, raw = next(layers)
                bar.set_postfix_str(f"layer {layer + 1}/{self.spec.num_layers}: calibrating")
                hidden = self.layer(layer, raw, hidden, rope, background)
                bar.update()
        for reducer in self.reducers:
            for stage, seconds in self.timer.seconds.items():
                reducer.timer.seconds[stage] += seconds
            reducer.conversion.shared_seconds = sum(self.timer.seconds.values())

    def layer(self, layer: int, raw: dict, hidden: torch.Tensor, rope,
              background: BackgroundWriter) -> torch.Tensor:
        """Advance the hidden states through one layer; every reducer writes its version."""
        layout = self.spec.family.experts
        with self.timer.stage("compute"):
            w = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in raw.items()
                 if not k.startswith(layout.prefixes())}
            hidden = attention_residual(self.spec, w, hidden, rope)
            flat = hidden.view(-1, self.spec.hidden)  # [T, H], shares hidden's storage
            x = ffn_input(self.spec, w, flat)
        if layer in self.spec.moe_layers:
            self.moe_layer(layer, raw, w, x, flat, background)
            return hidden
        with self.timer.stage("compute"):
            add_residual(self.spec, flat, dense_mlp(self.spec, w, x))
            self.synchronize()
        for reducer in self.reducers:
            background.submit(functools.partial(reducer.write_layer, layer, raw, {}))
        return hidden

    def moe_layer(self, layer: int, raw: dict, w: dict, x: torch.Tensor, flat: torch.Tensor,
                  background: BackgroundWriter) -> None:
        """Statistics once, then each reducer in turn (its write overlapping the next one's
        compute); then the layer's output, original or merged, added to flat."""
        spec = self.spec
        with self.timer.stage("compute"):
            experts = Experts.from_layer(raw, spec.family.experts, spec.num_experts,
                                         self.device, self.dtype)
            router = w[spec.family.router]
            stats = collect_layer_stats(x, router, experts, spec.routing, self.needs, self.seed)
            matcher = NeuronMatcher(x, stats.selected, experts)
        chosen = experts
        for reducer in self.reducers:
            new_router, merged, produced = reducer.reduce(layer, w, experts, x, stats, matcher)
            background.submit(functools.partial(reducer.write_layer, layer, raw, produced))
            if reducer is self.propagator:
                router, chosen = new_router, merged
            del new_router, merged, produced  # free the merged experts no later layer needs
        with self.timer.stage("compute"):
            add_residual(spec, flat, moe_block(spec, w, x, router, chosen))
            self.synchronize()

    def synchronize(self) -> None:
        """On CUDA, wait for the queued kernels, so the stage timer measures the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
