"""What hcconvert prints: the dry-run plan, `inspect`, and the final conversion summary."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import UserError
from ..io.source import Checkpoint, open_headers
from ..io.tensors import TORCH_DTYPES
from ..model.config_checks import ConfigValueError
from ..model.decoder import compute_dtype, pick_device
from ..model.families import family_for
from ..model.spec import ModelSpec
from ..pipeline.cost import measured_rates, run_seconds
from ..pipeline.estimate import estimate_memory, gpu_budget
from ..pipeline.options import ConvertOptions
from ..pipeline.plan import Plan, validate_tensors
from ..pipeline.preflight import check_output, check_text, download_bytes, plan_from_headers
from ..pipeline.records import Conversion
from ..resources import human_bytes, peak_gpu_bytes, peak_rss_bytes, process_seconds


def print_plan(src: str, options: ConvertOptions, out: Path | None = None,
               overwrite: bool = False, low_disk: bool = False) -> None:
    """The plan from SRC's headers, then the checks the real run makes before its work: a
    UserError from them means the real run would fail."""
    ckpt, options, plan = plan_from_headers(src, options)
    spec = plan.spec
    layer_bytes = plan.max_layer_bytes(ckpt)
    budget = options.max_gpu_memory
    if budget is None and torch.cuda.is_available():
        budget = gpu_budget(None, torch.device("cuda"))
    on_gpu = estimate_memory(ckpt, spec, options, layer_bytes, gpu=True,
                             mtp=bool(plan.mtp_layers), budget=budget)
    on_cpu = estimate_memory(ckpt, spec, options, layer_bytes, gpu=False,
                             mtp=bool(plan.mtp_layers))
    seconds = estimated_seconds(ckpt, plan, options)
    lines = [
        f"source        {ckpt.location}",
        f"family        {spec.family.model_type}",
        f"layers        {spec.num_layers} ({len(spec.moe_layers)} MoE: "
        f"{_ranges(spec.moe_layers)})",
        f"experts       {spec.num_experts} -> {plan.experts_out} per MoE layer",
        f"top-k         {spec.top_k} -> {plan.top_k_out}",
        f"method        {options.method}: {options.describe()}",
        f"tensors       {len(ckpt.tensors)} -> {len(plan.outputs)}",
        f"size          {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)}",
        *([f"quantized     {storage}"] if (storage := plan.storage.describe()) else []),
        f"largest layer {human_bytes(layer_bytes)}",
        *([f"gpu budget    {_budget_line(budget, on_gpu.chunk_experts, spec.num_experts)}"]
          if budget is not None else []),
        f"memory (est.) on a GPU: {human_bytes(on_gpu.device)} GPU + "
        f"{human_bytes(on_gpu.host)} host; on the CPU: {human_bytes(on_cpu.host)}",
        f"time (est.)   {seconds / 60:.1f} min on the {pick_device(options.device).type}",
        *_mtp_line(spec, plan.mtp_layers),
        *_download_line(ckpt, plan, low_disk),
    ]
    click.echo("\n".join(lines))
    # The checks the run makes before its work, in its order; the plan above stays shown.
    samples = check_text(ckpt, options)
    click.echo(f"calibration   {_calibration_line(options, samples)}")
    check_output(ckpt, plan, out, overwrite, low_disk)


def estimated_seconds(ckpt: Checkpoint, plan: Plan, options: ConvertOptions) -> float:
    """The run's time on the device it would use, at the rates measured there now."""
    spec = plan.spec
    device = pick_device(options.device)
    stored = TORCH_DTYPES[ckpt.tensors[spec.family.embedding].dtype]
    dtype = compute_dtype(device, stored, options.compute_dtype)
    element = torch.empty((), dtype=dtype).element_size()
    return run_seconds(spec, options, measured_rates(device, dtype), element,
                       device.type == "cuda", len(spec.moe_layers) + len(plan.mtp_layers))


def estimates(src: str, options: ConvertOptions) -> dict:
    """The dry run's estimates as numbers (bench/bench_layer.py checks them against runs)."""
    ckpt, options, plan = plan_from_headers(src, options)
    gpu = pick_device(options.device).type == "cuda"
    memory = estimate_memory(ckpt, plan.spec, options, plan.max_layer_bytes(ckpt), gpu=gpu,
                             mtp=bool(plan.mtp_layers))
    return {"minutes": estimated_seconds(ckpt, plan, options) / 60, "host": memory.host,
            "device": memory.device}


def _calibration_line(options: ConvertOptions, samples: int | None) -> str:
    """The calibration the run will cut: counted where the text was tokenized already."""
    if samples is None:
        return f"{options.calib_samples} x {options.seq_len} tokens (counted by the run)"
    short = (f" (the text gives {samples} of the {options.calib_samples} asked for)"
             if samples < options.calib_samples else "")
    return f"{samples} x {options.seq_len} tokens{short}"


def _download_line(ckpt: Checkpoint, plan: Plan, low_disk: bool) -> list[str]:
    """A Hub source: what its shards take in the HF cache (none for a local directory)."""
    if ckpt.root is not None:
        return []
    return [f"download      {human_bytes(download_bytes(ckpt, plan, False))} of shards, "
            f"at most {human_bytes(download_bytes(ckpt, plan, True))} in the HF cache at once "
            + ("(--low-disk)" if low_disk else "with --low-disk")]


def _budget_line(budget: int, chunk: int | None, experts: int) -> str:
    """How a MoE layer fits the GPU budget (shown where there is one: a GPU, or the option)."""
    limit = human_bytes(budget)
    if chunk is None:
        return f"{limit} (a MoE layer's experts all on the GPU)"
    return f"{limit} (experts on the host, at most {min(chunk, experts)} of {experts} per chunk " \
        "on the GPU)"


def _ranges(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def print_inspection(src: str, revision: str | None) -> None:
    """Describe SRC from its config and shard headers; an unsupported model is described too,
    with the reason, rather than failing."""
    ckpt = open_headers(src, revision)
    dtypes = sorted({info.dtype for info in ckpt.tensors.values()})
    footer = [f"dtype         {', '.join(dtypes)}",
              f"size          {human_bytes(ckpt.total_bytes)} in {len(ckpt.tensors)} tensors"]
    try:
        spec = ModelSpec.from_config(ckpt.config, family_for(ckpt.config))
    except ConfigValueError:
        raise
    except UserError as err:
        click.echo("\n".join([f"family        {ckpt.config.get('model_type')!r}: not supported "
                              f"({err})",
                              f"layers        {ckpt.config.get('num_hidden_layers', '?')}",
                              *footer]))
        return
    family = spec.family
    mtp_layers = None  # which are stored is known once the tensors check out
    try:
        mtp_layers = tuple(range(spec.num_layers, len(validate_tensors(ckpt, spec))))
        status = "supported"
    except UserError as err:
        status = f"supported family, but {err}"
    click.echo("\n".join([
        f"family        {family.model_type} ({status})",
        f"layers        {spec.num_layers}, MoE: {_ranges(spec.moe_layers)}",
        f"experts       {spec.num_experts} routed, top-{spec.top_k}, "
        f"shared expert: {_shared(spec)}",
        f"routing       {_routing(spec)}",
        *_mtp_line(spec, mtp_layers),
        *footer,
        f"layout        {family.experts.description}",
    ]))


def _mtp_line(spec: ModelSpec, stored: tuple[int, ...] | None) -> list[str]:
    """The multi-token-prediction layers: stored ones, or what config.json declares (None:
    not known which are stored); nothing for a model without any."""
    if stored:
        return [f"mtp           layer {_ranges(stored)}, reduced with the MoE layers"]
    if not spec.mtp_layers:
        return []
    declared = (f"config.json declares {len(spec.mtp_layers)}"
                if spec.family.mtp.count_key in spec.family.text_config(spec.config)
                else f"{len(spec.mtp_layers)} by default")
    return [f"mtp           {declared}" if stored is None
            else f"mtp           none stored ({declared})"]


def _shared(spec: ModelSpec) -> str:
    """Whether the MoE blocks have shared experts beside the routed ones (transformers names
    them shared_expert or shared_experts), and whether a sigmoid gate scales them."""
    decoder = spec.decoder()
    layer = spec.moe_layers[0] if spec.moe_layers else None
    if layer is None:
        return "no"
    block = decoder.layers[layer].get_submodule(decoder.moe_block(layer))
    children = {name for name, _ in block.named_children()}
    if not any(name.startswith("shared_expert") for name in children - {"shared_expert_gate"}):
        return "no"
    return "yes (sigmoid-gated)" if "shared_expert_gate" in children else "yes"


def _routing(spec: ModelSpec) -> str:
    routing = spec.routing
    parts = [f"{routing.scoring} top-{routing.top_k}"]
    if routing.groups is not None:
        parts.append(f"within the best {routing.groups.picked} of {routing.groups.count} "
                     "expert groups")
    return ", ".join(parts)


def layer_choices(conversion: Conversion) -> list[str]:
    """Per MoE layer, what --method auto chose and how well the reduced layer reproduces the
    original's output on held-out calibration tokens (nothing for a method without a fit)."""
    lines = []
    for result in conversion.layers:
        if result.fit is None:
            continue
        fit = result.fit
        chosen = f"{result.choice}, " if result.choice else ""
        if fit["error_fitted"] is None:
            outcome = f"not fitted: {fit['skipped']}"
        else:
            kept = "kept" if fit["fitted"] else "not kept: it did not generalise"
            outcome = f"{fit['error_fitted']:.4f} fitted at ridge {fit['ridge']:g} ({kept})"
        lines.append(f"layer {result.layer:<4} {chosen}held-out error "
                     f"{fit['error_unfitted']:.4f} unfitted, {outcome}")
    return lines


def requantization_summary(conversion: Conversion) -> list[str]:
    """The line on experts written back quantized, if any were."""
    records = [r.requantization for r in conversion.layers if r.requantization]
    if not records:
        return []
    count = sum(r["requantized"] for r in records)
    mean = sum(r["error_mean"] * r["requantized"] for r in records) / max(count, 1)
    return [f"requantized {count} expert weights ({conversion.plan.storage.fmt.method}), "
            f"relative error mean {mean:.4f}, max {max(r['error_max'] for r in records):.4f}; "
            f"{sum(r['copied'] for r in records)} copied as stored"]


def print_summary(conversion: Conversion) -> None:
    plan, timer = conversion.plan, conversion.timer
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timer.seconds.items())
    gpu = peak_gpu_bytes()
    wall = process_seconds() or timer.wall
    click.echo("\n".join([
        *layer_choices(conversion),
        f"wrote {conversion.out}: {plan.spec.num_experts} -> {plan.experts_out} experts "
        f"in {len(plan.spec.moe_layers)} MoE layers",
        f"size        {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)}",
        *requantization_summary(conversion),
        f"wall time   {wall:.1f}s from start-up; conversion {timer.wall:.1f}s ({stages})",
        f"peak memory host {human_bytes(peak_rss_bytes())}"
        + (f", GPU {human_bytes(gpu)}" if gpu is not None else ""),
        *([f"source disk peak {human_bytes(conversion.source_peak_bytes)} of "
           f"{human_bytes(plan.bytes_in)} (shards downloaded as the layers needed them)"]
          if conversion.source_peak_bytes else []),
    ]))
