"""Merging each group of experts into one expert (--merge).

- freq:     the members' weights averaged, weighted by router frequency (HC-SMoE's default).
- average:  the plain average.
- msmoe:    M-SMoE: every member's neurons permuted to match the dominant (most frequently
            picked) member's by activation correlation (Hungarian method), then freq.
- fix-dom:  HC-SMoE's fix-dominant merge: the dominant's neurons stay; each neuron of another
            member is averaged, frequency-weighted, into the dominant neuron it correlates
            with most (several may land on one, some on none).
- mergemoe: msmoe's gate and up, and the down projection fitted by least squares so the merged
            expert's output matches the members' frequency-weighted outputs (mergemoe.py).
- ream:     REAM's: every member's neurons matched to its group's leader (REAM lists it first)
            by activation and weight-feature distance (ream_alignment.py), then the weighted
            average, weighted by what the caller passes as counts (REAM: saliency).
A group of one is its expert unchanged. E experts, R groups, G members, F expert ffn, H hidden.
Arithmetic in fp32, results cast back to the source dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from ..model.experts import NEURON_AXIS, Experts
from .alignment import NeuronMatcher, aligned
from .mergemoe import least_squares_down

MERGES = ("freq", "average", "fix-dom", "msmoe", "mergemoe", "ream")

# One merged expert's tensors by Experts field: gate, up [F, H]; down [H, F]; any biases
# (merged with the same weights as their matrices).
Merged = dict[str, torch.Tensor]


def dominant(group: list[int], counts: torch.Tensor) -> int:
    """The group's most frequently picked member (ties to the lower index)."""
    return max(group, key=lambda e: (counts[e].item(), -e))


def member_weights(group: list[int], counts: torch.Tensor, merge: str) -> torch.Tensor:
    """Averaging weights of a group's members: by router frequency ("freq") or uniform.

    A group whose members the router never picked falls back to the plain average.
    """
    freq = counts[group].double()
    if merge == "average" or freq.sum() == 0:
        return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
    if merge != "freq":
        raise ValueError(f"unknown merge {merge!r}")
    return freq / freq.sum()


def weighted_sum(stacked: torch.Tensor, group: list[int], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights[i] · stacked[group[i]] in fp32, cast back to stacked's dtype (router rows)."""
    total = torch.zeros(stacked.shape[1:], dtype=torch.float32, device=stacked.device)
    for member, weight in zip(group, weights.tolist(), strict=True):
        total += stacked[member].float() * weight
    return total.to(stacked.dtype)


def weighted_members(members: Iterable[tuple[int, Merged]], weights: torch.Tensor) -> Merged:
    """Σ_i weights[i] · member i, tensor by tensor, in fp32, cast back to the members' dtype.
    One member at a time, as the members arrive on the device: a [G, F, H] fp32 copy of a big
    group would cost GBs at Mixtral sizes."""
    totals: Merged = {}
    dtypes: dict[str, torch.dtype] = {}
    for (_, member), weight in zip(members, weights.tolist(), strict=True):
        for name, tensor in member.items():
            if name not in totals:
                totals[name] = torch.zeros(tensor.shape, dtype=torch.float32,
                                           device=tensor.device)
                dtypes[name] = tensor.dtype
            totals[name] += tensor.float() * weight
    return {name: total.to(dtypes[name]) for name, total in totals.items()}


def merge_experts(experts: Experts, groups: list[list[int]], counts: torch.Tensor,
                  merge: str = "freq", matcher: NeuronMatcher | None = None) -> Experts:
    """One merged expert per group, in group order: gate, up [R, F, H]; down [R, H, F]. Only a
    group's members are brought to the compute device; the merged experts are kept where the
    layer's are and compute where they do.

    fix-dom, msmoe and mergemoe read activations: they need the layer's NeuronMatcher.
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose from {', '.join(MERGES)}")
    home = experts.up.device
    merged = [{name: tensor.to(home) for name, tensor in
               merge_group(experts, group, counts, merge, matcher).items()}
              for group in groups]
    return Experts.stacked(merged, experts.activation).kept_on(experts.device,
                                                              experts.chunk_experts)


def merge_group(experts: Experts, group: list[int], counts: torch.Tensor, merge: str,
                matcher: NeuronMatcher | None) -> Merged:
    if len(group) == 1:
        return next(experts.members(group))[1]
    if merge in ACTIVATION_RULES and matcher is None:
        raise ValueError(f"the {merge} merge needs calibration activations (a NeuronMatcher)")
    return RULES[merge](experts, group, counts, matcher)


def _averaged(experts: Experts, group: list[int], counts: torch.Tensor, matcher, *,
              rule: str) -> Merged:
    return weighted_members(experts.members(group), member_weights(group, counts, rule))


def _msmoe(experts: Experts, group: list[int], counts: torch.Tensor,
           matcher: NeuronMatcher) -> Merged:
    """Each member's neurons aligned to the dominant's as it arrives, then freq."""
    leader = dominant(group, counts)
    members = ((e, member if e == leader
                else aligned(member, matcher.permutation(group, leader, e)))
               for e, member in experts.members(group))
    return weighted_members(members, member_weights(group, counts, "freq"))


def _fix_dom(experts: Experts, group: list[int], counts: torch.Tensor,
             matcher: NeuronMatcher) -> Merged:
    leader = dominant(group, counts)
    share = dict(zip(group, member_weights(group, counts, "freq").tolist(), strict=True))
    first = next(experts.members([leader]))[1]
    dtypes = {name: tensor.dtype for name, tensor in first.items()}
    merged = {name: tensor.float() * share[leader] for name, tensor in first.items()}
    mass = torch.full((experts.up.shape[1],), share[leader],
                      device=first["up"].device)  # per merged neuron
    for e, member in experts.members([e for e in group if e != leader]):
        target = matcher.assignment(group, leader, e)  # [F]: each neuron's dominant neuron
        for name, tensor in member.items():
            axis = NEURON_AXIS[name]
            if axis is None:  # no neurons (down's bias): the shares sum to one
                merged[name] += tensor.float() * share[e]
            else:
                merged[name].index_add_(axis, target, tensor.float() * share[e])
        mass.index_add_(0, target, torch.full_like(mass, share[e]))
    return {name: (total if NEURON_AXIS[name] is None
                   else total / _along(mass, NEURON_AXIS[name], total.dim())).to(dtypes[name])
            for name, total in merged.items()}


def _along(values: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """values [F] shaped to broadcast along axis of a dims-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return values.view(shape)


def _mergemoe(experts: Experts, group: list[int], counts: torch.Tensor,
              matcher: NeuronMatcher) -> Merged:
    merged = _msmoe(experts, group, counts, matcher)
    weights = member_weights(group, counts, "freq")
    down = least_squares_down(matcher, experts, group, weights,
                              Experts.stacked([merged], experts.activation))
    return {**merged, "down": down.to(merged["down"].dtype)}


def _ream(experts: Experts, group: list[int], counts: torch.Tensor,
          matcher: NeuronMatcher) -> Merged:
    """Each member's neurons matched to the leader's (group[0]) as it arrives, then the
    weighted average (the official code's Merger._merge)."""
    leader = group[0]
    members = ((e, member if e == leader
                else aligned(member, matcher.ream.permutation(leader, e)))
               for e, member in experts.members(group))
    return weighted_members(members, member_weights(group, counts, "freq"))


RULES = {
    "freq": functools.partial(_averaged, rule="freq"),
    "average": functools.partial(_averaged, rule="average"),
    "msmoe": _msmoe,
    "fix-dom": _fix_dom,
    "mergemoe": _mergemoe,
    "ream": _ream,
}
ACTIVATION_RULES = ("msmoe", "fix-dom", "mergemoe", "ream")
