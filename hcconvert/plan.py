"""The conversion plan: every tensor read and written, resolved from headers before any weights.

Validating here means a bad checkpoint fails in a second, naming the offending tensor, instead of
an hour into a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .families import LAYER_PREFIX
from .source import Checkpoint
from .spec import ModelSpec
from .writer import OutputTensor

GQA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLA_ATTENTION = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


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
    return [spec.family.router, *spec.family.experts.shapes(count, spec.ffn, spec.hidden)]


def attention_suffixes(spec: ModelSpec) -> list[str]:
    """Every attention tensor our forward reads, with the layer norms around it."""
    family = spec.family
    if family.attention == "mla":
        q = (["self_attn.q_proj.weight"] if spec.mla.q_lora_rank is None else
             [f"self_attn.{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj")])
        names = q + [f"self_attn.{n}.weight" for n in MLA_ATTENTION]
    else:
        names = [f"self_attn.{n}.weight" for n in GQA_ATTENTION]
    if family.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if spec.attention_bias:
        names += [f"self_attn.{p}.bias" for p in family.biased_projections]
    return names + list(LAYER_NORMS)


def required_suffixes(spec: ModelSpec, layer: int) -> list[str]:
    """Every tensor our forward reads in this layer."""
    family = spec.family
    names = attention_suffixes(spec)
    if layer not in spec.moe_layers:
        return names + family.dense_mlp.all()
    names += moe_suffixes(spec, spec.num_experts)
    if family.shared_expert:
        names += family.shared_expert.all()
    if family.shared_expert_gate:
        names.append(family.shared_expert_gate)
    return names


def build_plan(ckpt: Checkpoint, spec: ModelSpec, experts_out: int) -> Plan:
    if not 1 <= experts_out < spec.num_experts:
        raise UserError(f"--experts must be between 1 and {spec.num_experts - 1} "
                        f"(the model has {spec.num_experts} experts per MoE layer)")
    if not spec.moe_layers:
        raise UserError("the config marks no layer as MoE: nothing to reduce")
    _check_routing_groups(spec, experts_out)
    layer_names = validate_tensors(ckpt, spec)
    global_outputs = [_copied(ckpt, n) for n in ckpt.tensors if not n.startswith("model.layers.")]
    layer_outputs = [_layer_outputs(ckpt, spec, layer, names, experts_out)
                     for layer, names in enumerate(layer_names)]
    return Plan(spec, experts_out, min(spec.top_k, experts_out), global_outputs, layer_names,
                layer_outputs, ckpt.total_bytes)


def _check_routing_groups(spec: ModelSpec, experts_out: int) -> None:
    """Group-limited routing needs whole groups: each group is reduced on its own."""
    groups = spec.routing.groups
    if groups > 1 and (spec.num_experts % groups or experts_out % groups):
        raise UserError(f"--experts {experts_out}: with group-limited routing (n_group={groups}) "
                        f"the expert count must be a multiple of {groups}")


def validate_tensors(ckpt: Checkpoint, spec: ModelSpec) -> list[list[str]]:
    """Check every tensor our forward needs against the headers; return each layer's names."""
    _check_global(ckpt, spec)
    return _layer_names(ckpt, spec)


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
        required = required_suffixes(spec, layer)
        for suffix in required:
            if prefix + suffix not in present:
                raise UserError(f"tensor {prefix + suffix} is missing from the checkpoint")
        _check_shapes(ckpt, prefix, _attention_shapes(spec))
        if layer in spec.moe_layers:
            _check_no_unknown_moe_tensors(spec, prefix, names, set(required))
            _check_moe_shapes(ckpt, spec, layer)
    return per_layer


def _attention_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Grouped-query projections as the config's heads and head_dim imply (MLA's are
    checked by the forward's own reshapes)."""
    if spec.family.attention != "gqa":
        return {}
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    return {"self_attn.q_proj.weight": (q, spec.hidden),
            "self_attn.k_proj.weight": (kv, spec.hidden),
            "self_attn.v_proj.weight": (kv, spec.hidden),
            "self_attn.o_proj.weight": (spec.hidden, q)}


def _check_shapes(ckpt: Checkpoint, prefix: str, expected: dict[str, tuple[int, ...]]) -> None:
    for suffix, shape in expected.items():
        info = ckpt.tensors[prefix + suffix]
        if info.shape != shape:
            raise UserError(f"tensor {prefix + suffix} has shape {list(info.shape)}, "
                            f"expected {list(shape)} from config.json")


def _check_no_unknown_moe_tensors(spec: ModelSpec, prefix: str, names: list[str],
                                  known: set[str]) -> None:
    """A tensor beside the router or the experts that we do not know (a router bias, say)
    would be copied with E rows into a model with R experts: refuse rather than corrupt."""
    family = spec.family
    owned = (family.router.rsplit(".", 1)[0] + ".", *family.experts.prefixes())
    for name in names:
        suffix = name.removeprefix(prefix)
        if suffix not in known and suffix.startswith(owned):
            raise UserError(f"tensor {name} belongs to the MoE block but the "
                            f"{family.model_type} family does not know how to reduce it")


def _copied(ckpt: Checkpoint, name: str) -> OutputTensor:
    info = ckpt.tensors[name]
    return OutputTensor(name, info.dtype, info.shape)


def _layer_outputs(ckpt, spec: ModelSpec, layer: int, names: list[str], experts_out: int):
    """Copied tensors in source order, then the reduced router and experts (same layout)."""
    if layer not in spec.moe_layers:
        return [_copied(ckpt, n) for n in names]
    prefix = LAYER_PREFIX.format(layer=layer)
    replaced = {prefix + s for s in moe_suffixes(spec, spec.num_experts)}
    outputs = [_copied(ckpt, n) for n in names if n not in replaced]
    router = ckpt.tensors[prefix + spec.family.router]
    outputs.append(OutputTensor(prefix + spec.family.router, router.dtype,
                                (experts_out, *router.shape[1:])))
    expert_shapes = spec.family.experts.shapes(experts_out, spec.ffn, spec.hidden)
    dtype = ckpt.tensors[prefix + next(iter(_source_expert_shapes(spec)))].dtype
    outputs += [OutputTensor(prefix + name, dtype, shape) for name, shape in expert_shapes.items()]
    return outputs


def _source_expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return spec.family.experts.shapes(spec.num_experts, spec.ffn, spec.hidden)


def _check_moe_shapes(ckpt: Checkpoint, spec: ModelSpec, layer: int) -> None:
    """Router [E, H]; experts as the layout stores them (config's F and H), all one dtype."""
    prefix = LAYER_PREFIX.format(layer=layer)
    experts = _source_expert_shapes(spec)
    _check_shapes(ckpt, prefix, {spec.family.router: (spec.num_experts, spec.hidden), **experts})
    expert_dtype = None
    for suffix in experts:
        info = ckpt.tensors[prefix + suffix]
        expert_dtype = expert_dtype or info.dtype
        if info.dtype != expert_dtype:
            raise UserError(f"tensor {prefix + suffix} is {info.dtype}, the other experts "
                            f"{expert_dtype}")
