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

import dataclasses
import functools
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from ..io.source import Checkpoint
from ..io.staging import check_output_dir, copy_side_files, staged_outputs
from ..io.streaming import BackgroundWriter, prefetched_layers
from ..io.tensors import TORCH_DTYPES
from ..io.writer import ShardWriter
from ..methods.alignment import NeuronMatcher
from ..methods.statistics import collect_layer_stats, statistics_kernel
from ..model.decoder import Decoder, HiddenStream, compute_dtype, pick_device
from ..model.experts import Experts, RoutedExperts, RoutingRecord
from ..model.mtp import NextTokenInputs
from ..model.spec import ModelSpec, open_source
from ..resources import StageTimer
from .calibration import load_calibration, pinned_sources
from .checks import plan_for
from .estimate import gpu_budget, layer_budget
from .metadata import reduced_config, write_metadata
from .options import ConvertOptions
from .plan import router_suffixes
from .records import Conversion, RunRecord
from .reduction import Reducer
from .resume import Progress, checkpoint_fingerprint, open_progress, run_key, source_identity

__all__ = ["LayerPipeline", "convert", "convert_many"]


def convert(src: str, out: Path, options: ConvertOptions, overwrite: bool = False,
            progress: bool = True, resume: bool | None = None,
            low_disk: bool = False) -> Conversion:
    """Convert SRC into a reduced checkpoint at OUT; nothing appears at OUT unless it succeeds.
    The run is resumable (resume.py): by default it goes on from where an interrupted run
    with the same source, options and hcconvert version stopped; resume=True also keeps this
    run's finished layers when it fails or is stopped; resume=False starts over. low_disk:
    a Hub source's shards leave the HF cache once read (remote.HubFiles)."""
    return convert_many(src, [(out, options)], overwrite, progress, resume, low_disk)[0]


def convert_many(src: str, outputs: list[tuple[Path, ConvertOptions]], overwrite: bool = False,
                 progress: bool = True, resume: bool | None = None,
                 low_disk: bool = False) -> list[Conversion]:
    """Several reductions of SRC from one pass over its layers, each into its own directory
    (its own shards, staging directory and hcconvert.json). They must share the calibration
    options; with more than one, all must propagate the original outputs, since merged
    propagation gives each its own hidden states. Nothing appears unless all succeed.
    A single output is resumable (see convert); several share private staging directories."""
    check_shareable([options for _, options in outputs])
    if len({out.resolve() for out, _ in outputs}) < len(outputs):
        raise ValueError("every output needs its own directory")
    ckpt, spec = open_source(src, outputs[0][1].revision, low_disk)
    prepared = [prepare_output(src, ckpt, spec, out, options, overwrite)
                for out, options in outputs]
    outputs = [(out, options) for (out, _), (options, _) in zip(outputs, prepared, strict=True)]
    conversions = [conversion for _, conversion in prepared]
    first = outputs[0][1]
    device = pick_device(first.device)
    key = (run_key(source_identity(src), first, checkpoint_fingerprint(src, ckpt))
           if len(outputs) == 1 else None)
    with staged_outputs([out for out, _ in outputs], ckpt.root, overwrite, key,
                        keep=resume is True, fresh=resume is False) as stagings:
        tokens = load_calibration(ckpt, first.calib, first.calib_samples, first.seq_len,
                                  first.seed, first.text_field)
        state = (open_progress(stagings[0], key, tokens, len(conversions[0].plan.layer_names))
                 if key is not None else None)
        reducers, run = run_pass(ckpt, spec, device, tokens, conversions, outputs, stagings,
                                 progress, state)
        for reducer, staging in zip(reducers, stagings, strict=True):
            copy_side_files(ckpt.root, staging)
            write_metadata(staging, ckpt, reducer.conversion, reducer.options, run)
    for conversion in conversions:
        conversion.source_peak_bytes = ckpt.files.peak_bytes
    return conversions


def run_pass(ckpt: Checkpoint, spec: ModelSpec, device: torch.device, tokens: torch.Tensor,
             conversions: list[Conversion], outputs: list[tuple[Path, ConvertOptions]],
             stagings: list[Path], progress: bool,
             state: Progress | None = None) -> tuple[list[Reducer], RunRecord]:
    """One pass over the layers writing every output's shards into its staging directory,
    from the first layer an interrupted run left unfinished (state: a single output's);
    returns the reducers and how the pass computed (device, dtype, statistics kernel)."""
    position = state.state.writer_position if state is not None else 0
    with ExitStack() as writers:
        reducers = [Reducer(conversion, options, writers.enter_context(
                        ShardWriter(staging, conversion.plan.outputs, options.max_shard_size,
                                    position)))
                    for conversion, (_, options), staging
                    in zip(conversions, outputs, stagings, strict=True)]
        if state is not None:
            conversions[0].layers[:] = state.results()
        pipeline = LayerPipeline(ckpt, spec, device, reducers, outputs[0][1].seed, state)
        pipeline.run(tokens, progress)
    return reducers, RunRecord(device.type, str(pipeline.dtype).removeprefix("torch."),
                               statistics_kernel(device))


def check_shareable(options: list[ConvertOptions]) -> None:
    """Programming errors in a caller of convert_many (the CLI never builds such a list)."""
    if not options:
        raise ValueError("convert_many needs at least one output")
    if len({o.calibration_key() for o in options}) > 1:
        raise ValueError("outputs that share a pass must share the calibration options")
    if len(options) > 1 and any(o.propagates_merged for o in options):
        raise ValueError("--propagate merged gives each output its own pass")


def prepare_output(src: str, ckpt: Checkpoint, spec: ModelSpec, out: Path,
                   options: ConvertOptions, overwrite: bool) -> tuple[ConvertOptions, Conversion]:
    """One output's options checked against the model and completed by it, and its plan,
    before any weight is read."""
    options, plan = plan_for(ckpt, spec, options)
    check_output_dir(out, ckpt.root, overwrite)
    options = dataclasses.replace(options, calib=pinned_sources(options.calib))
    return options, Conversion(source_identity(src), out, plan)


class LayerPipeline:
    """Streams the checkpoint through the calibration hidden states, layer by layer, feeding
    every reducer; each MoE layer's statistics are collected once, for all of them."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, device: torch.device,
                 reducers: list[Reducer], seed: int, progress: Progress | None = None):
        self.ckpt, self.spec, self.device, self.reducers = ckpt, spec, device, reducers
        # A single output's resumable state: where to start, and a checkpoint per layer.
        self.progress = progress
        if progress is not None and len(reducers) != 1:
            raise ValueError("a resumable pass has one output")
        self.plan = reducers[0].plan  # every output reduces the same source layers
        self.seed = seed
        self.needs = frozenset().union(*(r.needs for r in reducers))
        # The reducer whose output feeds the next layer (--propagate merged), if any.
        self.propagator = next((r for r in reducers if r.options.propagates_merged), None)
        self.timer = StageTimer()  # the shared stages, credited to every conversion at the end
        self.dtype = torch.float32  # the compute dtype, set by run from the embedding's
        self.reduced_decoders: dict[int, Decoder] = {}  # by expert count
        # How the source stores its weights (reading does not depend on an output's --dtype).
        self.storage = reducers[0].plan.storage

    def run(self, tokens: torch.Tensor, progress: bool) -> None:
        embedding = self.ckpt.tensors[self.spec.family.embedding]
        self.dtype = compute_dtype(self.device, TORCH_DTYPES[embedding.dtype],
                                   self.reducers[0].options.compute_dtype)
        self.decoder = self.spec.decoder(self.dtype)
        self.budget = gpu_budget(self.reducers[0].options.max_gpu_memory, self.device)
        # Once per reduced layer, before any weight is read: a budget too small fails here.
        self.chunk_experts = {layer: self.expert_chunk(layer)
                              for layer in range(len(self.plan.layer_names))
                              if self.spec.reduces(layer)}
        with self.timer.stage("read"):  # once, for every output
            globals_ = self.ckpt.read(self.plan.global_names)
        num_layers = len(self.plan.layer_names)  # the MTP layer last, if stored
        start = self.progress.finished if self.progress is not None else 0
        # A resumed run never reads the layers it finished (--low-disk: their shards may go).
        self.ckpt.release([name for names in self.plan.layer_names[:start] for name in names])
        with self.timer.stage("forward"):
            dense_globals = self.dense(globals_, None)
            self.decoder.load_globals(dense_globals, self.device)
            stream = HiddenStream(self.decoder, tokens, self.device)
            next_tokens = (NextTokenInputs(self.decoder, tokens, self.device,
                                           self.mtp_own(dense_globals))
                           if self.plan.mtp_layers else None)
            self.decoder.drop_globals()
        if start == 0:
            for reducer in self.reducers:
                reducer.write_globals(globals_)
        elif start < num_layers:
            self.progress.restore(stream)
        del globals_
        bar = tqdm(total=num_layers, initial=start, desc="layers", unit="layer",
                   disable=not progress, file=sys.stderr)
        prefixes = [self.spec.layer_prefix(i) for i in range(num_layers)]
        layers = prefetched_layers(self.ckpt, prefixes[start:], pin=self.device.type == "cuda")
        with BackgroundWriter() as background, bar:
            for _ in range(start, num_layers):
                bar.set_postfix_str(f"layer {bar.n + 1}/{num_layers}: reading")
                # The background read's own time, and how long the compute waited for it
                # (on the CPU, checking it for NaN and returning the last layer's memory too).
                with self.timer.stage("read wait"):
                    layer, raw, seconds = next(layers)
                self.timer.seconds["read"] += seconds
                layer += start  # prefetched_layers counts from the first unfinished layer
                bar.set_postfix_str(f"layer {layer + 1}/{num_layers}: calibrating")
                if layer in self.plan.mtp_layers:
                    with self.timer.stage("forward"):
                        stream = next_tokens.stream_for(self.dense(raw, layer), stream)
                self.layer(layer, raw, stream, background)
                self.checkpoint(layer, stream, background)
                bar.update()
        for reducer in self.reducers:
            for stage, seconds in self.timer.seconds.items():
                reducer.timer.seconds[stage] += seconds
            for stage, peak in self.timer.peaks.items():
                reducer.timer.peaks[stage] = max(reducer.timer.peaks[stage], peak)
            reducer.conversion.shared_seconds = sum(self.timer.seconds.values())

    def checkpoint(self, layer: int, stream: HiddenStream, background: BackgroundWriter) -> None:
        """With a resumable state: the hidden states after layer saved now, and the layer
        recorded as finished once its writes are done (behind them on the writer's thread)."""
        if self.progress is None:
            return
        (reducer,) = self.reducers
        position = len(self.plan.global_outputs) + sum(
            len(outputs) for outputs in self.plan.layer_outputs[:layer + 1])
        last = layer + 1 == len(self.plan.layer_names)  # no layer needs its hidden states
        with self.timer.stage("checkpoint"):
            background.then(self.progress.layer_done(layer, stream, reducer.writer,
                                                     reducer.conversion.layers, position, last))

    def layer(self, layer: int, raw: dict, stream: HiddenStream,
              background: BackgroundWriter) -> None:
        """Advance the hidden states through one layer; every reducer writes its version."""
        if self.spec.reduces(layer):
            self.moe_layer(layer, raw, stream, background)
            return
        with self.timer.stage("forward"):
            tensors, _ = self.decoder.layer_parts(layer, self.dense(raw, layer), self.device)
            stream.advance(layer, self.decoder.build_layer(layer, tensors))
            self.synchronize()
        for reducer in self.reducers:
            background.submit(functools.partial(reducer.write_layer, layer, raw, {}))

    def moe_layer(self, layer: int, raw: dict, stream: HiddenStream,
                  background: BackgroundWriter) -> None:
        """One forward of the original layer (its output advances the stream, its router's
        choices feed the statistics), each reducer in turn (its write overlapping the next
        one's compute), then with --propagate merged the reduced layer's output instead."""
        spec, family = self.spec, self.spec.family
        with self.timer.stage("forward"):
            dense = self.dense(raw, layer)
            tensors, experts = self.decoder.layer_parts(layer, dense, self.device,
                                                        self.chunk_experts[layer])
            self.release_stored_experts(layer, raw)
            # On the CPU the forward also sums the activations for the output statistics,
            # reusing its products; on CUDA the Triton kernel sums them without materialising.
            record = RoutingRecord(stream.tokens, saliency="saliency" in self.needs,
                                   keep_output=any(r.fits_layers for r in self.reducers),
                                   activation_sums=("output" in self.needs
                                                    and self.device.type == "cpu"))
            module = self.decoder.build_layer(layer, tensors, RoutedExperts(experts, record))
            self.decoder.record_router_inputs(module, record)
            layer_input = stream.hidden.clone() if self.propagator is not None else None
            stream.advance(layer, module)
            del module
        with self.timer.stage("statistics"):
            x, selected = record.routing()
            router_x = record.router_inputs(x)
            router = {s: dense[s].to(self.device) for s in router_suffixes(spec)}
            stats = collect_layer_stats(x, selected, router[family.router], experts,
                                        self.needs, self.seed, record)
            matcher = NeuronMatcher(x, selected, experts, self.seed + layer, self.timer)
        for reducer in self.reducers:
            reduced_router, merged, produced = reducer.reduce(
                layer, raw, router, experts, x, stats, matcher, self.routing(layer, tensors),
                record.outputs, router_x)
            background.submit(functools.partial(reducer.write_layer, layer, raw, produced))
            if reducer is self.propagator:
                with self.timer.stage("forward"):
                    self.propagate(layer, tensors, reduced_router, merged, stream, layer_input)
            del reduced_router, merged, produced  # free the merged experts no later layer needs
        self.synchronize()

    def release_stored_experts(self, layer: int, raw: dict) -> None:
        """Drop the layer's routed experts as stored once they are stacked for the compute,
        unless an output writes some of them back as stored (a quantized source's kept
        experts): a layer's worth of host memory less at the layer's peak."""
        if any(layer in reducer.plan.requantized for reducer in self.reducers):
            return
        prefixes = self.spec.family.stored_layout(raw).prefixes()
        router = set(router_suffixes(self.spec))  # some families keep a bias among the experts
        for name in [n for n in raw if n.startswith(prefixes) and n not in router]:
            del raw[name]

    def expert_chunk(self, layer: int) -> int | None:
        """How many of a MoE layer's experts the GPU budget lets the device hold at once
        (None: all of them, and the merged ones)."""
        other = sum(torch.Size(shape).numel()
                    for shape, _ in self.decoder.expected_tensors(layer).values())
        # Every output is reduced in turn: the most experts kept bounds the merged ones, and
        # any layer fit keeps its target.
        options = dataclasses.replace(
            self.reducers[0].options, experts=max(r.options.experts for r in self.reducers),
            layer_fit=any(r.fits_layers for r in self.reducers))
        # The budget is a GPU's, counted as --dry-run counts it (the fit's best state parked
        # on the host) even where a CPU run stands in for the GPU, so both refuse alike.
        return layer_budget(self.spec, options, self.dtype, other, bool(self.plan.mtp_layers),
                            self.budget, gpu=True).chunk_experts

    def dense(self, stored: dict, layer: int | None):
        """A layer's stored tensors (the globals for None) as the forward reads them, quantized
        weights dequantized on the device (storage.DenseTensors)."""
        prefix = "" if layer is None else self.spec.layer_prefix(layer)
        return self.storage.dense(stored, prefix, self.device, self.dtype)

    def mtp_own(self, dense_globals: Mapping) -> dict[str, torch.Tensor]:
        """The MTP layer's own tensors where they are stored outside it (Qwen's mtp.fc...),
        taken from the globals as the forward reads them, by name below their prefix."""
        mtp = self.spec.family.mtp
        if mtp.own_prefix is None:
            return {}
        return {name: dense_globals[mtp.own_prefix + name] for name in mtp.required}

    def reduced_decoder(self, experts: int) -> Decoder:
        """The skeleton of the model with `experts` routed experts per MoE layer, built once."""
        if experts not in self.reduced_decoders:
            config = reduced_config(self.spec.config, self.spec.family, experts,
                                    min(self.spec.top_k, experts))
            self.reduced_decoders[experts] = Decoder(config, self.spec.family, self.dtype)
        return self.reduced_decoders[experts]

    def reduced_layer_tensors(self, layer: int, tensors: dict, router: dict,
                              experts: int) -> tuple[Decoder, dict]:
        """The reduced model's skeleton and the layer's tensors with its reduced router."""
        named = self.decoder.layer_names(layer, self.spec.family.layer_prefix(layer), router)
        return self.reduced_decoder(experts), {**tensors, **named}

    def routing(self, layer: int, tensors: dict):
        """routing(router tensors, expert count) -> the routing rule of the layer reduced to
        that many experts with those router tensors (reduction.Routing)."""
        def rule(router: dict, experts: int):
            decoder, named = self.reduced_layer_tensors(layer, tensors, router, experts)
            return decoder.routing(layer, named)
        return rule

    def propagate(self, layer: int, tensors: dict, router: dict, merged: Experts,
                  stream: HiddenStream, layer_input: torch.Tensor) -> None:
        """The reduced layer's output, from the layer's input, replaces the original's."""
        decoder, named = self.reduced_layer_tensors(layer, tensors, router, len(merged))
        stream.advance(layer, decoder.build_layer(layer, named, RoutedExperts(merged)),
                       layer_input)

    def synchronize(self) -> None:
        """On CUDA, wait for the queued kernels, so the stage timer measures the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
