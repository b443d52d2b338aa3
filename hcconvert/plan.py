"""The conversion plan: every tensor read and written, resolved from headers before any weights.

Validating here means a bad checkpoint fails in a second, naming the offending tensor, instead of
an hour into a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .families import LAYER_PREFIX, ExpertNames
from .modeling import ModelSpec
from .source import Checkpoint
from .writer import OutputTensor

ATTENTION = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass
class Plan:
    spec: ModelSpec
    experts_out: int
    top_k_out: int
    global_outputs: list[OutputTensor]  # tensors outside the decoder layers, copied first
    layer_names: list[list[str]]  # per layer: its source tensors (full names)
    layer_outputs: list[list[OutputTensor]]  # per layer: what it writes, in order
    bytes_in: int

    @property
    def outputs(self) -> list[OutputTensor]:
        """Every output tensor in write order: globals first, then layer by layer."""
        return self.global_outputs + [t for layer in self.layer_outputs for t in layer]

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def layer_prefix(self, layer: int) -> str:
        return LAYER_PREFIX.format(layer=layer)

    def max_layer_bytes(self, ckpt: Checkpoint) -> int:
        return max(sum(ckpt.tensors[n].nbytes for n in names) for names in self.layer_names)


def moe_suffixes(spec: ModelSpec, count: int) -> list[str]:
    """The per-layer tensors a MoE reduction replaces: router and routed experts."""
    names = spec.family.experts
    return [spec.family.router] + [template.format(expert=e) for e in range(count)
                                   for template in (names.gate, names.up, names.down)]


def required_suffixes(spec: ModelSpec, layer: int) -> list[str]:
    """Every tensor our forward reads in this layer."""
    family = spec.family
    names = list(ATTENTION)
    if family.attention_bias:
        names += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if family.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if layer not in spec.moe_layers:
        return names + _expert_list(family.dense_mlp)
    names += moe_suffixes(spec, spec.num_experts)
    if family.shared_expert:
        names += _expert_list(family.shared_expert)
    if family.shared_expert_gate:
        names.append(family.shared_expert_gate)
    return names


def _expert_list(names: ExpertNames) -> list[str]:
    return [names.gate, names.up, names.down]


def build_plan(ckpt: Checkpoint, spec: ModelSpec, experts_out: int) -> Plan:
    if not 1 <= experts_out < spec.num_experts:
        raise UserError(f"--experts must be between 1 and {spec.num_experts - 1} "
                        f"(the model has {spec.num_experts} experts per MoE layer)")
    if not spec.moe_layers:
        raise UserError("the config marks no layer as MoE: nothing to reduce")
    _check_global(ckpt, spec)
    layer_names = _layer_names(ckpt, spec)
    global_outputs = [_copied(ckpt, n) for n in ckpt.tensors if not n.startswith("model.layers.")]
    layer_outputs = [_layer_outputs(ckpt, spec, layer, names, experts_out)
                     for layer, names in enumerate(layer_names)]
    return Plan(spec, experts_out, min(spec.top_k, experts_out), global_outputs, layer_names,
                layer_outputs, ckpt.total_bytes)


def _check_global(ckpt: Checkpoint, spec: ModelSpec) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_embeddings:
        needed.append("lm_head.weight")
    for name in needed:
        if name not in ckpt.tensors:
            raise UserError(f"tensor {name} is missing from the checkpoint")


def _layer_names(ckpt: Checkpoint, spec: ModelSpec) -> list[list[str]]:
    per_layer: list[list[str]] = [[] for _ in range(spec.num_layers)]
    for name in ckpt.tensors:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer >= spec.num_layers:
                raise UserError(f"tensor {name} is beyond num_hidden_layers={spec.num_layers}")
            per_layer[layer].append(name)
    for layer, names in enumerate(per_layer):
        prefix = LAYER_PREFIX.format(layer=layer)
        present = set(names)
        for suffix in required_suffixes(spec, layer):
            if prefix + suffix not in present:
                raise UserError(f"tensor {prefix + suffix} is missing from the checkpoint")
        if layer in spec.moe_layers:
            _check_moe_shapes(ckpt, spec, layer)
    return per_layer


def _copied(ckpt: Checkpoint, name: str) -> OutputTensor:
    info = ckpt.tensors[name]
    return OutputTensor(name, info.dtype, info.shape)


def _layer_outputs(ckpt, spec: ModelSpec, layer: int, names: list[str], experts_out: int):
    """Copied tensors in source order, then the reduced router and experts 0..R-1."""
    if layer not in spec.moe_layers:
        return [_copied(ckpt, n) for n in names]
    prefix = LAYER_PREFIX.format(layer=layer)
    replaced = {prefix + s for s in moe_suffixes(spec, spec.num_experts)}
    outputs = [_copied(ckpt, n) for n in names if n not in replaced]
    router = ckpt.tensors[prefix + spec.family.router]
    outputs.append(OutputTensor(prefix + spec.family.router, router.dtype,
                                (experts_out, *router.shape[1:])))
    for expert in range(experts_out):
        for template in _expert_list(spec.family.experts):
            info = ckpt.tensors[prefix + template.format(expert=0)]  # merged shape = expert 0's
            outputs.append(OutputTensor(prefix + template.format(expert=expert), info.dtype,
                                        info.shape))
    return outputs


def _check_moe_shapes(ckpt: Checkpoint, spec: ModelSpec, layer: int) -> None:
    """Router [E, H]; every expert's gate and up [F, H] and down [H, F], one dtype."""
    prefix = LAYER_PREFIX.format(layer=layer)
    router = ckpt.tensors[prefix + spec.family.router]
    if router.shape != (spec.num_experts, spec.hidden):
        raise UserError(f"tensor {prefix + spec.family.router} has shape {list(router.shape)}, "
                        f"expected [{spec.num_experts}, {spec.hidden}]")
    names = spec.family.experts
    ffn = ckpt.tensors[prefix + names.gate.format(expert=0)].shape[0]
    expected = {names.gate: (ffn, spec.hidden), names.up: (ffn, spec.hidden),
                names.down: (spec.hidden, ffn)}
    for expert in range(spec.num_experts):
        for template, shape in expected.items():
            name = prefix + template.format(expert=expert)
            if ckpt.tensors[name].shape != shape:
                raise UserError(f"tensor {name} has shape {list(ckpt.tensors[name].shape)}, "
                                f"expected {list(shape)}")
