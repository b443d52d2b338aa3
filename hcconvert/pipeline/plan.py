"""The conversion plan: every tensor read and written, resolved from headers before any weights.

Each layer's tensors are checked against the modules transformers builds for that layer from
config.json (names and shapes), and the routed experts against the family's layout, so a bad
checkpoint fails in a second, naming the offending tensor, instead of an hour into a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError, first_line
from ..io.source import Checkpoint
from ..io.storage import Shape, Storage
from ..io.tensors import OutputTensor
from ..model.decoder import Decoder
from ..model.layouts import ExpertLayout
from ..model.spec import ModelSpec


@dataclass
class Plan:
    spec: ModelSpec
    experts_out: int
    top_k_out: int
    global_names: list[str]  # source tensors outside the decoder layers
    global_outputs: list[OutputTensor]  # what they write, first
    layer_names: list[list[str]]  # per layer: its source tensors (full names)
    layer_outputs: list[list[OutputTensor]]  # per layer: what it writes, in order
    bytes_in: int
    storage: Storage  # quantized weights, and how this output writes them
    requantized: frozenset[int]  # MoE layers whose new experts are written quantized

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """The multi-token-prediction layers the checkpoint holds, after the decoder layers."""
        return tuple(range(self.spec.num_layers, len(self.layer_names)))

    @property
    def outputs(self) -> list[OutputTensor]:
        """Every output tensor in write order: globals first, then layer by layer."""
        return self.global_outputs + [t for layer in self.layer_outputs for t in layer]

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def layer_prefix(self, layer: int) -> str:
        return self.spec.layer_prefix(layer)

    def max_layer_bytes(self, ckpt: Checkpoint) -> int:
        return max(sum(ckpt.tensors[n].nbytes for n in names) for names in self.layer_names)


def router_suffixes(spec: ModelSpec) -> list[str]:
    """The router tensors a reduction gives one row (or entry) per remaining expert."""
    return list(spec.family.router_tensors)


def moe_suffixes(spec: ModelSpec, layout: ExpertLayout, count: int) -> list[str]:
    """The per-layer tensors a MoE reduction replaces: router and routed experts."""
    return [*router_suffixes(spec), *layout.shapes(count, spec.ffn, spec.hidden)]


def stored_layout(spec: ModelSpec, layer: int, names: list[str]) -> ExpertLayout:
    """How layer `layer`, whose tensors are `names` (full names), stores its experts."""
    prefix = spec.layer_prefix(layer)
    return spec.family.stored_layout({name.removeprefix(prefix) for name in names})


def build_plan(ckpt: Checkpoint, spec: ModelSpec, experts_out: int,
               dtype: str = "source") -> Plan:
    """Every tensor read and written when the experts are reduced to experts_out (checked
    against the model by checks.for_model first); dtype: --dtype, how quantized weights are
    written (storage.DTYPES)."""
    storage = Storage.of(ckpt).writing(dtype)
    layer_names = validate_tensors(ckpt, spec, storage)
    global_names = spec.global_names(ckpt.tensors)
    global_outputs = storage.copied(global_names, ckpt.tensors)
    layer_outputs = [_layer_outputs(ckpt, spec, storage, layer, names, experts_out)
                     for layer, names in enumerate(layer_names)]
    requantized = frozenset(
        layer for layer, names in enumerate(layer_names) if spec.reduces(layer)
        and storage.requantizes(spec.layer_prefix(layer)
                                + stored_layout(spec, layer, names).marker))
    return Plan(spec, experts_out, min(spec.top_k, experts_out), global_names, global_outputs,
                layer_names, layer_outputs, ckpt.total_bytes, storage, requantized)


def validate_tensors(ckpt: Checkpoint, spec: ModelSpec,
                     storage: Storage | None = None) -> list[list[str]]:
    """Check every tensor transformers' modules and our experts need against the headers
    (a quantized weight by its dequantized shape); return each layer's names (the decoder
    layers', then the MTP layer's if stored)."""
    storage = storage or Storage.of(ckpt)
    decoder = spec.decoder()
    every = storage.logical(ckpt.tensors, ckpt.tensors)
    _check_globals(every, decoder)
    _refuse_experts_outside_layers(spec, ckpt.tensors)
    per_layer = _names_by_layer(ckpt, spec)
    for layer, names in enumerate(per_layer):
        own = _check_mtp_tensors(every, spec, decoder, layer) if layer in spec.mtp_layers \
            else set()
        tensors = storage.logical(names, ckpt.tensors)
        _check_layer({n: info for n, info in tensors.items() if n not in own}, spec, decoder,
                     layer)
    return per_layer


def _refuse_experts_outside_layers(spec: ModelSpec, names) -> None:
    """Routed experts outside every layer the family reduces (a multi-token-prediction layer
    stored where the family does not say, as mtp.*) would be copied with E experts into an
    R-expert checkpoint: refused by name."""
    stray = next((name for name in spec.global_names(names) if ".experts." in name), None)
    if stray is not None:
        raise UserError(f"tensor {stray} holds routed experts outside the decoder layers "
                        f"hcconvert reduces for {spec.family.model_type}: a copy would keep "
                        f"{spec.num_experts} experts there")


def _check_globals(tensors: dict[str, tuple[str, Shape]], decoder: Decoder) -> None:
    """Embeddings, final norm and (untied) LM head, with the skeleton's shapes."""
    on_disk = {decoder.module_name(n): n for n in tensors}
    for name, tensor in decoder.model.state_dict(keep_vars=True).items():
        if name.startswith("model.layers."):
            continue
        if decoder.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name not in on_disk:
            raise UserError(f"tensor {decoder.disk_name(name)} is missing from the checkpoint")
        _check_shape(tensors, on_disk[name], tuple(tensor.shape))


def _names_by_layer(ckpt: Checkpoint, spec: ModelSpec) -> list[list[str]]:
    """Each stored layer's tensor names: the decoder layers', then the first MTP layer's if
    the checkpoint holds it (transformers, and so many re-uploads, drop MTP layers)."""
    stored = spec.num_layers + len(spec.mtp_layers)
    per_layer: list[list[str]] = [[] for _ in range(stored)]
    for name in ckpt.tensors:
        layer = spec.layer_of(name)
        if layer is not None:
            per_layer[layer].append(name)
    mtp = per_layer[spec.num_layers:]
    later = next((names[0] for names in mtp[1:] if names), None)
    if later is not None:
        # Depth k > 1 is fed depth k-1's output: a chain we do not calibrate (and no
        # supported family ships one).
        raise UserError(f"tensor {later} belongs to a second multi-token-prediction layer; "
                        "hcconvert calibrates one (num_nextn_predict_layers=1)")
    return per_layer[:spec.num_layers] + [names for names in mtp[:1] if names]


def _check_layer(tensors: dict[str, tuple[str, Shape]], spec: ModelSpec, decoder: Decoder,
                 layer: int) -> None:
    """Every tensor the layer's modules load is present with its shape, nothing unknown is
    there, and the experts are as the family stores them. tensors: the layer's, as
    Storage.logical gives them."""
    prefix = spec.layer_prefix(layer)
    module_prefix = f"model.layers.{layer}."
    # An MTP layer's tensors are named as transformers would name a decoder layer's there.
    text_prefix = spec.family.layer_prefix(layer)
    expected = decoder.expected_tensors(layer)
    layout = stored_layout(spec, layer, list(tensors))
    experts = _expert_shapes(spec, layout) if spec.reduces(layer) else {}
    stored = {name.removeprefix(prefix): name for name in tensors
              if name.removeprefix(prefix) not in experts}
    plain, groups = decoder.conversions(text_prefix, stored)
    found = set()
    for suffix, module in plain.items():
        module = module.removeprefix(module_prefix)
        _check_module(spec, stored[suffix], module, expected)
        _check_shape(tensors, stored[suffix], expected[module][0])
        found.add(module)
    for joined in groups:
        found |= _check_joined(spec, decoder, joined, {s: stored[s] for s in joined.names},
                               tensors, module_prefix, expected)
    missing = sorted(set(expected) - found)
    if missing:
        stored = decoder.disk_name(module_prefix + missing[0]).removeprefix(text_prefix)
        raise UserError(f"tensor {prefix + stored} is missing from the checkpoint")
    if experts:
        _check_experts(tensors, prefix, experts, layout.biases)


def _check_module(spec: ModelSpec, name: str, module: str, expected: dict) -> None:
    if module not in expected:
        raise UserError(f"tensor {name} is not part of a {spec.family.model_type} layer "
                        "as config.json describes it")


def _check_joined(spec: ModelSpec, decoder: Decoder, joined, names: dict[str, str],
                  tensors: dict[str, tuple[str, Shape]], module_prefix: str,
                  expected: dict) -> set[str]:
    """Stored tensors transformers joins or splits on loading (names: stored name below the
    layer -> full name) make the modules' tensors with their shapes; returns those modules."""
    meta = {suffix: torch.empty(tensors[name][1], device="meta")
            for suffix, name in names.items()}
    listed = ", ".join(names.values())
    try:
        made = decoder.convert(joined, meta)
    except (RuntimeError, ValueError, IndexError) as err:
        raise UserError(f"tensors {listed} do not make the "
                        f"{spec.family.model_type} layer's tensors: {first_line(err)}") from None
    modules = set()
    for full, tensor in made.items():
        module = full.removeprefix(module_prefix)
        _check_module(spec, listed, module, expected)
        if tuple(tensor.shape) != expected[module][0]:
            raise UserError(f"tensors {listed} make {module} of shape {list(tensor.shape)}, "
                            f"expected {list(expected[module][0])} from config.json")
        modules.add(module)
    return modules


def _check_mtp_tensors(tensors: dict[str, tuple[str, Shape]], spec: ModelSpec,
                       decoder: Decoder, layer: int) -> set[str]:
    """MTP layer `layer`'s own tensors are all there with their shapes (tensors: every
    tensor, as Storage.logical gives them); returns their names."""
    prefix = spec.mtp_own_prefix(layer)
    mtp = spec.family.mtp
    missing = next((prefix + s for s in mtp.required if prefix + s not in tensors), None)
    if missing is not None:
        raise UserError(f"tensor {missing} is missing from the checkpoint")
    own = {prefix + name: shape
           for name, shape in mtp.shapes(spec.hidden, decoder.config.vocab_size).items()
           if prefix + name in tensors}
    for name, shape in own.items():
        _check_shape(tensors, name, shape)
    return set(own)


def _expert_shapes(spec: ModelSpec, layout: ExpertLayout) -> dict[str, tuple[int, ...]]:
    return layout.shapes(spec.num_experts, spec.ffn, spec.hidden)


def _check_experts(tensors: dict[str, tuple[str, Shape]], prefix: str,
                   shapes: dict[str, Shape], biases: tuple[str, ...]) -> None:
    """Present, with the config's F and H, the matrices all of one dtype (or all quantized
    alike; biases may differ: GPT-OSS's stay bf16 beside MXFP4 matrices)."""
    expert_dtype = None
    for suffix, shape in shapes.items():
        name = prefix + suffix
        if name not in tensors:
            raise UserError(f"tensor {name} is missing from the checkpoint")
        _check_shape(tensors, name, shape)
        if suffix in biases:
            continue
        dtype = tensors[name][0]
        expert_dtype = expert_dtype or dtype
        if dtype != expert_dtype:
            raise UserError(f"tensor {name} is {dtype}, the other experts {expert_dtype}")


def _check_shape(tensors: dict[str, tuple[str, Shape]], name: str, shape: Shape) -> None:
    found = tensors[name][1]
    if found != shape:
        raise UserError(f"tensor {name} has shape {list(found)}, "
                        f"expected {list(shape)} from config.json")


def _layer_outputs(ckpt: Checkpoint, spec: ModelSpec, storage: Storage, layer: int,
                   names: list[str], experts_out: int) -> list[OutputTensor]:
    """Copied tensors in source order, then the reduced router and experts (same layout,
    stored as the source's experts are, or dense with --dtype bf16)."""
    if not spec.reduces(layer):
        return storage.copied(names, ckpt.tensors)
    prefix = spec.layer_prefix(layer)
    layout = stored_layout(spec, layer, names)
    replaced = {stored for suffix in moe_suffixes(spec, layout, spec.num_experts)
                for stored in storage.stored_names(prefix + suffix)}
    outputs = storage.copied([n for n in names if n not in replaced], ckpt.tensors)
    for suffix in router_suffixes(spec):
        info = ckpt.tensors[prefix + suffix]
        # The router weight's rows, or a bias's last axis, are the experts.
        shape = ((experts_out, *info.shape[1:]) if suffix == spec.family.router
                 else (*info.shape[:-1], experts_out))
        outputs.append(OutputTensor(prefix + suffix, info.dtype, shape))
    # Each new expert tensor is stored as the source's tensor of its name is (experts are
    # renumbered 0..R-1 below E): a quantized weight requantized, a bias (GPT-OSS's, bf16
    # beside MXFP4 matrices) in its dtype.
    for name, shape in layout.shapes(experts_out, spec.ffn, spec.hidden).items():
        outputs += storage.replacing(prefix + name, shape, ckpt.tensors)
    return outputs
