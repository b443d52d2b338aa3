"""The conversion pipeline, one decoder layer at a time: read, calibrate, cluster, merge, write.

Per layer: attention with the original weights; for a MoE layer, statistics over all calibration
tokens, grouping, merging and router reduction; then the next layer's input (the original
layer's output, as in the paper, or the merged layer's with --propagate merged). Only the
calibration hidden states stay resident; a layer's weights are freed before the next is read.
T tokens, H hidden, E experts, R groups.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .calibration import load_calibration
from .clustering import group_experts
from .errors import UserError
from .families import family_for
from .merging import merge_experts
from .metadata import write_metadata
from .modeling import (
    Experts,
    ModelSpec,
    add_residual,
    attention_residual,
    dense_mlp,
    embed,
    ffn_input,
    moe_block,
    rope_tables,
)
from .options import ConvertOptions
from .plan import Plan, build_plan
from .pruning import prune_groups
from .resources import StageTimer
from .router import reduce_router
from .source import Checkpoint, resolve_source
from .statistics import LayerStats, collect_layer_stats, group_logsumexp_gram
from .streaming import BackgroundWriter, prefetched_layers
from .writer import (
    TORCH_DTYPES,
    ShardWriter,
    check_output_dir,
    copy_side_files,
    publish,
    staging_dir,
)


@dataclass
class LayerResult:
    layer: int
    groups: list[list[int]]
    counts: list[float]  # top-k selections per original expert
    tokens: int


@dataclass
class Conversion:
    """What a conversion did, for hcconvert.json, the model card and the summary."""

    source: str
    out: Path
    plan: Plan
    layers: list[LayerResult] = field(default_factory=list)
    timer: StageTimer = field(default_factory=StageTimer)


def open_source(src: str, revision: str | None = None) -> tuple[Checkpoint, ModelSpec]:
    ckpt = Checkpoint(resolve_source(src, revision))
    return ckpt, ModelSpec.from_config(ckpt.config, family_for(ckpt.config))


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(device: torch.device, source_dtype: torch.dtype) -> torch.dtype:
    """Half-precision weights compute in their dtype on the GPU; the CPU computes in fp32."""
    if device.type == "cuda" and source_dtype in (torch.bfloat16, torch.float16):
        return source_dtype
    return torch.float32


def convert(src: str, out: Path, options: ConvertOptions, overwrite: bool = False,
            progress: bool = True) -> Conversion:
    """Convert SRC into a reduced checkpoint at OUT; nothing appears at OUT unless it succeeds."""
    ckpt, spec = open_source(src, options.revision)
    plan = build_plan(ckpt, spec, options.experts)
    check_output_dir(out, ckpt.root, overwrite)
    device = pick_device(options.device)
    tokens = load_calibration(ckpt.root, options.calib, options.calib_samples, options.seq_len,
                              options.seed)
    conversion = Conversion(src, out, plan)
    staging = staging_dir(out)
    try:
        with ShardWriter(staging, plan.outputs, options.max_shard_size) as writer:
            LayerPipeline(ckpt, plan, options, device, conversion, writer).run(tokens, progress)
        copy_side_files(ckpt.root, staging)
        write_metadata(staging, ckpt, conversion, options)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return conversion


class LayerPipeline:
    """Streams the checkpoint through the calibration hidden states, layer by layer."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, options: ConvertOptions,
                 device: torch.device, conversion: Conversion, writer: ShardWriter):
        self.ckpt, self.plan, self.spec = ckpt, plan, plan.spec
        self.options, self.device, self.conversion = options, device, conversion
        self.writer, self.timer = writer, conversion.timer
        self.dtype = torch.float32

    def run(self, tokens: torch.Tensor, progress: bool) -> None:
        with self.timer.stage("read"):
            table = self.ckpt.get("model.embed_tokens.weight")
        self.dtype = compute_dtype(self.device, table.dtype)
        hidden = embed(self.spec, table, tokens).to(self.device, self.dtype)  # [N, S, H]
        del table
        rope = rope_tables(self.spec, tokens.shape[1], self.device, self.dtype)
        with self.timer.stage("write"):
            for tensor in self.plan.global_outputs:
                self.writer.write(tensor.name, self.ckpt.get(tensor.name))
        bar = tqdm(total=self.spec.num_layers, desc="layers", unit="layer",
                   disable=not progress, file=sys.stderr)
        layers = prefetched_layers(self.ckpt, self.spec.num_layers,
                                   pin=self.device.type == "cuda")
        with BackgroundWriter() as background, bar:
            while True:
                bar.set_postfix_str(f"layer {bar.n + 1}/{self.spec.num_layers}: reading")
                with self.timer.stage("read"):  # time spent waiting for the prefetch
                    layer, raw = next(layers, (None, None))
                if layer is None:
                    break
                bar.set_postfix_str(f"layer {layer + 1}/{self.spec.num_layers}: calibrating")
                with self.timer.stage("compute"):
                    hidden, produced = self.layer(layer, raw, hidden, rope)
                background.submit(lambda layer=layer, raw=raw, produced=produced:
                                  self.write_layer(layer, raw, produced))
                bar.update()

    def layer(self, layer: int, raw: dict, hidden: torch.Tensor, rope):
        """Advance the hidden states through one layer; returns them and the layer's new
        tensors (by full name, on the CPU)."""
        layout = self.spec.family.experts
        w = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in raw.items()
             if not k.startswith(layout.prefixes())}
        hidden = attention_residual(self.spec, w, hidden, rope)
        flat = hidden.view(-1, self.spec.hidden)  # [T, H], shares hidden's storage
        x = ffn_input(self.spec, w, flat)
        produced = {}
        if layer in self.spec.moe_layers:
            experts = Experts.from_layer(raw, layout, self.spec.num_experts)
            produced = self.reduce_moe(layer, w, experts.to(self.device, self.dtype), x, flat)
        else:
            add_residual(self.spec, flat, dense_mlp(self.spec, w, x))
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # so the stage timer measures the work, not the launches
        return hidden, {name: t.to("cpu") for name, t in produced.items()}

    def write_layer(self, layer: int, raw: dict, produced: dict) -> None:
        """Write one layer's tensors in plan order: new ones, and the rest copied as stored."""
        prefix = self.plan.layer_prefix(layer)
        with self.timer.stage("write"):
            for tensor in self.plan.layer_outputs[layer]:
                value = produced.get(tensor.name)
                if value is None:
                    value = raw[tensor.name.removeprefix(prefix)]
                self.writer.write(tensor.name, value.to(TORCH_DTYPES[tensor.dtype]))

    def reduce_moe(self, layer: int, w: dict, experts: Experts, x: torch.Tensor,
                   flat: torch.Tensor) -> dict:
        """Group and merge one MoE layer's experts; add the chosen MoE output to flat."""
        spec, options = self.spec, self.options
        family = spec.family
        router = w[family.router]
        stats = collect_layer_stats(x, router, experts, spec.routing)
        groups = self.choose_groups(stats)
        merged = merge_experts(experts, groups, stats.counts, options.merge)
        gram = cross = None
        if options.router == "lse-fit":
            gram, cross = group_logsumexp_gram(x, router, groups)
        new_router = reduce_router(router, groups, stats.counts, options.router, gram, cross)
        if options.propagate == "merged":
            add_residual(spec, flat, moe_block(spec, w, x, new_router, merged))
        else:
            add_residual(spec, flat, moe_block(spec, w, x, router, experts))
        self.conversion.layers.append(
            LayerResult(layer, groups, stats.counts.tolist(), stats.tokens))
        return self.merged_tensors(layer, new_router, merged)

    def choose_groups(self, stats: LayerStats) -> list[list[int]]:
        """The expert groups. Under group-limited routing each routing group of experts is
        reduced on its own, to R/n_group experts, so every merged expert stays in its group."""
        size = self.spec.num_experts // self.spec.routing.groups
        keep = self.options.experts // self.spec.routing.groups
        groups = []
        for start in range(0, self.spec.num_experts, size):
            local = self.group_slice(stats, slice(start, start + size), keep)
            groups += [[start + e for e in group] for group in local]
        return groups

    def group_slice(self, stats: LayerStats, members: slice, keep: int) -> list[list[int]]:
        options = self.options
        counts = stats.counts[members]
        if options.method == "prune":
            return prune_groups(counts, keep)
        return group_experts(stats.output_mean[members].double().numpy(), counts.numpy(), keep,
                             grouping=options.grouping, linkage=options.linkage,
                             seed=options.seed)

    def merged_tensors(self, layer: int, router: torch.Tensor, merged: Experts) -> dict:
        """Reduced router and experts by full name, in the source's expert layout."""
        prefix = self.plan.layer_prefix(layer)
        family = self.spec.family
        tensors = {family.router: router, **merged.to_layer(family.experts)}
        return {prefix + name: tensor for name, tensor in tensors.items()}
