"""The options checked against the model, in one place: the run, `--dry-run` and `compare`
call for_model before any weight is read, so each refuses exactly what the others refuse."""

from __future__ import annotations

import dataclasses

from ..errors import UserError, warn
from ..io.source import Checkpoint
from ..methods.layerfit import MIN_FIT_TOKENS, fit_tokens_per_expert
from ..model.spec import ModelSpec
from .options import DEFAULT_SEQ_LEN, ConvertOptions, flag
from .plan import Plan, build_plan

# Settings that need REAM's groups, whose first member is their leader.
REAM_ONLY = {"merge": ("ream",), "router": ("leader",)}


def plan_for(ckpt: Checkpoint, spec: ModelSpec,
             options: ConvertOptions) -> tuple[ConvertOptions, Plan]:
    """The options checked against the model and completed by it (for_model), and the plan
    of every tensor the run reads and writes."""
    options = for_model(options, spec)
    return options, build_plan(ckpt, spec, options.experts, options.dtype)


def for_model(options: ConvertOptions, spec: ModelSpec) -> ConvertOptions:
    """The options with what the model decides filled in (the sequence length); an option
    this model cannot take is a UserError naming it."""
    check_experts(spec, options.experts)
    for name, reduction in options.reductions().items():
        check_reduction(spec, options, name, reduction)
    options = dataclasses.replace(options, seq_len=sequence_length(spec, options.seq_len))
    check_fit_tokens(spec, options)
    return options


def check_fit_tokens(spec: ModelSpec, options: ConvertOptions) -> None:
    """Say once when the calibration gives the layer fit too few tokens per kept expert: the
    layers will keep their unfitted candidates."""
    if not options.fits_layers:
        return
    tokens = options.calib_samples * options.seq_len
    per_expert = fit_tokens_per_expert(tokens, min(spec.top_k, options.experts),
                                       options.experts)
    if per_expert < MIN_FIT_TOKENS:
        warn(f"the calibration gives about {per_expert} fit tokens per kept expert, fewer "
             f"than the {MIN_FIT_TOKENS} the layer fit needs: layers keep their unfitted "
             "reductions (more --calib-samples or a longer --seq-len give the fit its tokens)")


def sequence_length(spec: ModelSpec, given: int | None) -> int:
    """--seq-len, or the paper's 2048 capped to the model's context (said once)."""
    positions = spec.family.text_config(spec.config).get("max_position_embeddings")
    if given is None:
        if positions and positions < DEFAULT_SEQ_LEN:
            warn(f"--seq-len {positions}: the model's max_position_embeddings, below the "
                 f"default {DEFAULT_SEQ_LEN}")
            return positions
        return DEFAULT_SEQ_LEN
    if positions and given > positions:
        raise UserError(f"--seq-len {given} is above the model's max_position_embeddings "
                        f"({positions}); give at most {positions}")
    return given


def check_experts(spec: ModelSpec, experts: int) -> None:
    """--experts against the model: fewer than it has, at least what its router always
    picks, and whole routing groups where the routing is group-limited."""
    if not 1 <= experts < spec.num_experts:
        raise UserError(f"--experts must be between 1 and {spec.num_experts - 1} "
                        f"(the model has {spec.num_experts} experts per MoE layer)")
    if not spec.moe_layers:
        raise UserError("the config marks no layer as MoE: nothing to reduce")
    if spec.family.fixed_top_k and experts < spec.top_k:
        raise UserError(f"--experts {experts}: {spec.family.model_type}'s router always "
                        f"picks {spec.top_k} experts; keep at least {spec.top_k}")
    check_routing_groups(spec, experts)
    if experts < spec.top_k:
        warn(f"top-k drops from {spec.top_k} to {experts} (only {experts} experts remain)")


def check_reduction(spec: ModelSpec, options: ConvertOptions, name: str, reduction) -> None:
    """One reduction the run tries (auto tries several) against the model."""
    if reduction.merges and reduction.router == "lse-fit" and spec.routing.scoring != "softmax":
        raise UserError(f"--router lse-fit fits softmax mass; {spec.family.model_type}'s router "
                        f"scores with {spec.routing.scoring} (method {name} merges experts; "
                        "use freq-avg or dominant)")
    if reduction.kind != "ream":
        for option, value in (("merge", reduction.merge), ("router", reduction.router)):
            if value in REAM_ONLY[option]:
                raise UserError(f"{flag(option)} {value} works on REAM's leaders: method {name} "
                                "has none (use a REAM method: ream, ream-balanced)")
    size = reduction.max_group_size
    if reduction.merges and size is not None and options.experts * size < spec.num_experts:
        raise UserError(f"{flag('max_group_size')} {size}: {options.experts} groups of at "
                        f"most {size} cannot hold {spec.num_experts} experts")


def valid_expert_counts(spec: ModelSpec) -> list[int]:
    """Every R that group-limited routing can serve: whole groups of at least `ranked_by`
    experts each, enough of them in the picked groups to fill the top-k."""
    groups = spec.routing.groups
    if groups is None:
        return list(range(1, spec.num_experts))
    return [r for r in range(groups.count, spec.num_experts, groups.count)
            if r // groups.count >= groups.ranked_by
            and groups.picked * (r // groups.count) >= spec.top_k]


def check_routing_groups(spec: ModelSpec, experts_out: int) -> None:
    """Group-limited routing needs whole groups (each group is reduced on its own) that can
    still fill every token's top-k."""
    groups = spec.routing.groups
    if groups is None:
        return
    if spec.num_experts % groups.count:
        raise UserError(f"config.json: {spec.num_experts} experts do not form "
                        f"{groups.count} routing groups")
    valid = valid_expert_counts(spec)
    if experts_out not in valid:
        shown = ", ".join(map(str, valid)) if valid else "none"
        raise UserError(f"--experts {experts_out}: group-limited routing (n_group="
                        f"{groups.count}, topk_group={groups.picked}, top-{spec.top_k}) "
                        f"needs one of: {shown}")
