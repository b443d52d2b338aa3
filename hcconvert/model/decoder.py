"""The decoder, one layer at a time, through transformers' own modules.

transformers builds the text model's skeleton on the meta device, which costs no memory. Each
decoder layer is materialised on its own from the streamed tensors, run over the calibration
hidden states and dropped. Attention of every kind, norms, dense MLPs, shared experts and the
router are transformers' code; the routed experts are ours (experts.RoutedExperts), so the
statistics see every routing decision and a reduction can run in the layer unchanged.

The model-level work (embeddings and their multipliers, position embeddings, attention masks
per layer type, final norm, LM head and logit scaling) is transformers' too: the skeleton's
own forward runs with its layers replaced by recorders (to capture each layer's input and
arguments) or by the finished hidden states (to get the logits).
N sequences, S tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import UserError, first_line
from . import conversions
from .causal_lm import causal_lm
from .experts import Experts, PrescaledExperts
from .families import Family

EXPERTS_ATTRIBUTE = "experts"  # transformers 5's MoE blocks call self.experts(x, index, weights)
# Sequences per layer call: bounds attention's [heads, S, S] scores on the CPU.
ATTENTION_BATCH = 4


# The torch.cpu probe of each half precision's matrix unit (AMX): with it a CPU multiplies
# that dtype several times faster than fp32 (bf16 6x on the bench machine). Without one
# (AVX512-BF16 alone, or emulation) no gain was measured, so such CPUs keep fp32. Private
# torch API: a torch without the probe counts as no unit.
CPU_MATRIX_UNIT = {torch.bfloat16: "_is_amx_tile_supported",
                   torch.float16: "_is_amx_fp16_supported"}


def compute_dtype(device: torch.device, source_dtype: torch.dtype,
                  requested: str = "auto") -> torch.dtype:
    """The dtype the layers compute in: the one requested (options.COMPUTE_DTYPES), or by
    default half-precision weights' own dtype on a GPU and on a CPU with a matrix unit for it
    (half_is_fast), fp32 otherwise."""
    if requested != "auto":
        return getattr(torch, requested)
    if source_dtype in CPU_MATRIX_UNIT and (device.type == "cuda" or half_is_fast(source_dtype)):
        return source_dtype
    return torch.float32


def half_is_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU has a matrix unit for dtype (CPU_MATRIX_UNIT) that torch uses."""
    probe = getattr(torch.cpu, CPU_MATRIX_UNIT[dtype], None)
    return bool(probe is not None and torch.backends.mkldnn.is_available() and probe())


class _RoutingCatcher(nn.Module):
    """Stands in for a block's experts to catch the router's top-k weights and index."""

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        self.caught = (weights.float(), index)
        return torch.zeros_like(x)


class _Stop(Exception):
    """Raised by the last recorder: the layers' inputs are known, the rest is not needed."""


def transformers_config(config: dict, family: Family):
    """The transformers config of the text model that config.json describes."""
    from transformers import CONFIG_MAPPING

    text = family.text_config(config)
    model_type = family.transformers_type or text.get("model_type") or family.model_type
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"this transformers has no model_type {model_type!r}; upgrade it")
    # Quantized storage is ours to read: transformers must not plan its own quantizer.
    # A deep copy: transformers rewrites nested settings (rope_scaling) in place.
    # transformers writes inf and NaN as {"__float__": "Infinity"} (Nemotron-H's
    # time_step_limit) and reads them back so.
    text = CONFIG_MAPPING[model_type]._decode_special_floats(copy.deepcopy(
        {k: v for k, v in text.items() if k not in ("quantization_config", "auto_map")}))
    tied = _wrapper_ties_embeddings(config, family)
    if tied is not None:
        text["tie_word_embeddings"] = tied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return CONFIG_MAPPING[model_type].from_dict({**text, "model_type": model_type})
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise UserError(f"config.json is not a valid {model_type} config: "
                            f"{first_line(err)}") from None


def wrapper_transforms(family: Family) -> list:
    """The weight renamings and converters transformers keeps on a vision-language wrapper
    whose checkpoints name the text model otherwise (Family.wrapper_mapping): applied to the
    names on disk, they place the text model under model.language_model."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if family.wrapper_mapping is None:
        return []
    return get_checkpoint_conversion_mapping(family.wrapper_mapping) or []


WRAPPED_TEXT_MODEL = "model.language_model."  # where transformers 5 places a wrapper's


def _wrapper_ties_embeddings(config: dict, family: Family) -> bool | None:
    """Whether a vision-language wrapper ties its LM head to the text embeddings: the
    wrapper's own setting, as transformers 5 reads it (not text_config's, which Qwen3-VL's
    configs set otherwise); None for a text model, or a wrapper transformers does not know."""
    from transformers import CONFIG_MAPPING

    if family.text_config_key is None or config.get("model_type") not in CONFIG_MAPPING:
        return None
    settings = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wrapper = CONFIG_MAPPING[config["model_type"]].from_dict(copy.deepcopy(settings))
        except (TypeError, ValueError, KeyError, AttributeError):
            return None
    return bool(getattr(wrapper, "tie_word_embeddings", False))


class Decoder:
    """A text model's skeleton (on the meta device) that builds and runs one layer at a time."""

    def __init__(self, config: dict, family: Family, dtype: torch.dtype = torch.float32):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        self.family, self.dtype, self.source_config = family, dtype, config
        self.config = transformers_config(config, family)
        with torch.device("meta"), _default_dtype(dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # dtype: from_config would otherwise build in config.json's dtype (a bf16
                # skeleton then hands bf16 hidden states to fp32 layers).
                self.model = causal_lm(self.config, dtype)
            except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
                raise UserError(f"transformers cannot build this {family.model_type} model "
                                f"from config.json: {first_line(err)}") from None
        self.model.eval()
        transforms = get_model_conversion_mapping(self.model)
        wrapper = wrapper_transforms(family)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.wrapper_renamings = [t for t in wrapper if isinstance(t, WeightRenaming)]
        self.converters = conversions.layer_converters(transforms + wrapper)
        self.reverse_renamings = [t.reverse_transform() for t in reversed(self.renamings)]
        self.reverse_wrapper = [t.reverse_transform() for t in reversed(self.wrapper_renamings)]
        self.layers = self.model.model.layers

    # -- names and shapes ------------------------------------------------------------------

    def module_name(self, name: str) -> str:
        """A tensor's name in the skeleton's state dict, from its name on disk: the text
        model's own (Family.text_name), or as the wrapper's renamings place it."""
        from transformers.core_model_loading import apply_renamings

        if self.wrapper_renamings:
            placed = apply_renamings(name, self.wrapper_renamings)
            text = ("model." + placed.removeprefix(WRAPPED_TEXT_MODEL)
                    if placed.startswith(WRAPPED_TEXT_MODEL) else placed)
        else:
            text = self.family.text_name(name)
        return apply_renamings(text, self.renamings)

    def disk_name(self, module_name: str) -> str:
        """Where the Hub's checkpoints keep a module's tensor (for messages)."""
        from transformers.core_model_loading import apply_renamings

        name = apply_renamings(module_name, self.reverse_renamings)
        if self.wrapper_renamings:
            if name.startswith("model."):
                name = WRAPPED_TEXT_MODEL + name.removeprefix("model.")
            return apply_renamings(name, self.reverse_wrapper)
        if name.startswith("lm_head."):
            return self.family.head_prefix + name
        # A wrapper's own renamings may already restore its text prefix.
        if name.startswith(self.family.text_prefix) or not name.startswith("model."):
            return name
        return self.family.text_prefix + name.removeprefix("model.")

    def layer_names(self, layer: int, prefix: str, tensors: dict) -> dict:
        """A layer's tensors, keyed on disk below `prefix`, keyed by their names in the
        layer's transformers module: renamed, and joined or split where transformers
        converts them on loading (conversions.py)."""
        module_prefix = f"model.layers.{layer}."
        plain, groups = self.conversions(prefix, tensors)
        named = {plain[name]: tensor for name, tensor in tensors.items() if name in plain}
        for joined in groups:
            named.update(self.convert(joined, tensors))
        return {name.removeprefix(module_prefix): tensor for name, tensor in named.items()}

    def conversions(self, prefix: str, names) -> tuple[dict[str, str], list[conversions.Joined]]:
        """The stored names below `prefix` no converter takes (-> full module name), and the
        groups transformers' converters join or split."""
        return conversions.group({name: self.module_name(prefix + name) for name in names},
                                 self.converters)

    def convert(self, joined: conversions.Joined, tensors: dict) -> dict:
        """A group's module tensors (full module names) from its stored tensors."""
        return conversions.convert(joined, tensors, self.model, self.config)

    def layer_parts(self, layer: int, raw: dict[str, torch.Tensor], device: torch.device,
                    chunk_experts: int | None = None):
        """A layer's tensors as stored, split into the module's tensors on the device (by
        module name) and, in a MoE layer, its routed experts stacked in the compute dtype:
        on the device, or with chunk_experts (a GPU budget, estimate.layer_budget) on the host
        (pinned for CUDA), brought to the device that many at a time."""
        layout = self.family.stored_layout(raw)
        # By key: looking a quantized expert up dequantizes it (storage.DenseTensors). A router
        # bias may sit among the experts' names (Laguna's experts.e_score_correction_bias).
        kept = {k: raw[k].to(device, non_blocking=True) for k in raw
                if not k.startswith(layout.prefixes()) or k in self.family.router_tensors}
        tensors = self.layer_names(layer, self.family.layer_prefix(layer), kept)
        if self.moe_block(layer) is None:
            return tensors, None
        count = self.family.text_config(self.source_config)[self.family.experts_key(
            self.source_config)]
        home = device if chunk_experts is None else torch.device("cpu")
        activation = self.family.activation(self.config, self.skeleton_layer(layer))
        experts = Experts.from_layer(raw, layout, count, home, self.dtype, activation,
                                     pin=home != device and device.type == "cuda")
        return tensors, experts.kept_on(device, chunk_experts)

    def moe_block(self, layer: int) -> str | None:
        """The MoE block's path in a layer (e.g. "mlp"), None for a dense layer."""
        return _moe_path(self.layers[self.skeleton_layer(layer)])

    def skeleton_layer(self, layer: int) -> int:
        """The skeleton layer whose module class, index and arguments serve layer `layer`:
        itself, or for a multi-token-prediction layer (transformers builds no module for
        it) the last MoE layer with full attention, since an MTP layer's decoder block is a
        full-attention MoE decoder layer (vLLM builds Qwen3-Next's and Qwen3.5's with
        layer_type="full_attention" among linear-attention layers)."""
        if layer < len(self.layers):
            return layer
        kinds = getattr(self.config, "layer_types", None) or []
        moe = [index for index, module in enumerate(self.layers)
               if _moe_path(module) is not None
               and (index >= len(kinds) or kinds[index] == "full_attention")]
        if not moe:
            raise UserError(f"layer {layer}: a multi-token-prediction layer needs a MoE layer "
                            "with full attention in the model to be built like")
        return moe[-1]

    def expected_tensors(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor a layer loads except its routed experts: module name below the layer
        -> (shape, dtype)."""
        block = self.moe_block(layer)
        skip = _experts_prefix(block) if block is not None else None
        module = self.layers[self.skeleton_layer(layer)]
        return {name: (tuple(t.shape), t.dtype)
                for name, t in module.state_dict(keep_vars=True).items()
                if skip is None or not name.startswith(skip)}

    # -- running layers --------------------------------------------------------------------

    def build_layer(self, layer: int, tensors: dict[str, torch.Tensor],
                    experts: nn.Module | None = None) -> nn.Module:
        """Layer `layer` with the given tensors (module names below the layer, any dtype: each
        is cast to the dtype transformers gives it) and, in a MoE layer, our routed experts.
        (A reduced layer is built by the reduced model's Decoder.)"""
        skeleton = self.skeleton_layer(layer)
        with torch.device("meta"), _default_dtype(self.dtype):
            module = type(self.layers[skeleton])(self.config, skeleton)
        block = self.moe_block(layer)
        if block is not None:
            if experts is None:
                raise ValueError(f"layer {layer} is a MoE layer: it needs its experts")
            if self.family.prescaled_inputs:
                router = self.family.router.removesuffix(".weight")
                experts = PrescaledExperts(experts, module.get_submodule(router))
            setattr(module.get_submodule(block), EXPERTS_ATTRIBUTE, experts)
        expected = {n: t.dtype for n, t in module.state_dict(keep_vars=True).items()
                    if block is None or not n.startswith(_experts_prefix(block))}
        cast = {n: tensors[n].to(dtype) for n, dtype in expected.items() if n in tensors}
        missing = sorted(set(expected) - set(cast))
        if missing:
            raise UserError(f"layer {layer}: tensor {missing[0]} is missing")
        module.load_state_dict(cast, strict=False, assign=True)
        return module.eval()

    def routing(self, layer: int, tensors: dict[str, torch.Tensor]):
        """The routing rule of layer `layer` built from tensors (module names), as a callable
        x [T, H] -> (weights [T, K], index [T, K]), x what the router reads: the family's own
        MoE block routes, its experts replaced by a catcher; or where the block is the whole
        decoder layer (Gemma 4), its router module on its own."""
        catcher = _RoutingCatcher()
        module = self.build_layer(layer, tensors, catcher)
        if self.family.router_module is not None:
            router = module.get_submodule(self.family.router_module)

            @torch.no_grad()
            def route_alone(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                _, weights, index = router(x)
                return weights.float(), index
            return route_alone
        block = module.get_submodule(self.moe_block(layer))

        @torch.no_grad()
        def route(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            block(x[None])  # blocks take [N, S, H]; their output is not needed
            return catcher.caught
        return route

    def record_router_inputs(self, module: nn.Module, record) -> None:
        """Where the router reads other inputs than the experts (Family.router_module), have
        the built layer module hand the record (experts.RoutingRecord) what its router reads."""
        if self.family.router_module is not None:
            module.get_submodule(self.family.router_module).register_forward_pre_hook(
                lambda router, args: record.observe_router(args[0]))

    @torch.no_grad()
    def layer_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """The first layer's input [N, S, H] for tokens [N, S], and the keyword arguments the
        model passes each layer (masks, position embeddings), as its own forward computes them.
        Needs the embedding table loaded (load_globals)."""
        return self._recorded_inputs(tokens, use_cache=False)

    @torch.no_grad()
    def cached_inputs(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, list[dict],
                                                                      object]:
        """layer_inputs for tokens [N, s] that follow those the cache holds (None: none yet),
        and the cache: transformers' own object, of the kind the family's forward makes (its
        layers add their keys and values to it as they run)."""
        given = {} if cache is None else {self.cache_argument: cache}
        hidden, arguments = self._recorded_inputs(tokens, use_cache=True, **given)
        return hidden, arguments, arguments[0][self.cache_argument]

    @functools.cached_property
    def cache_argument(self) -> str:
        """The keyword the model's forward takes its KV cache by (transformers 5.25 renamed
        past_key_values to cache)."""
        parameters = inspect.signature(self.model.model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _recorded_inputs(self, tokens: torch.Tensor, **model_arguments):
        calls: list[tuple[torch.Tensor, dict]] = []
        last = len(self.layers) - 1

        def recorder(index: int):
            def forward(hidden_states, *args, **kwargs):
                calls.append((hidden_states, kwargs))
                if index == last:
                    raise _Stop
                return self.layer_output(hidden_states)
            return forward

        with self._layers_replaced(recorder), contextlib.suppress(_Stop):
            self.model(input_ids=tokens, **model_arguments)
        return calls[0][0], [kwargs for _, kwargs in calls]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """[N, S, V] fp32 logits from the last layer's output (final norm, LM head and the
        family's logit scaling applied by transformers)."""
        last = len(self.layers) - 1

        def finished(index: int):
            def forward(hidden_states, *args, **kwargs):
                return self.layer_output(final_hidden if index == last else hidden_states)
            return forward

        with self._layers_replaced(finished):
            return self.model(input_ids=tokens, use_cache=False).logits.float()

    def layer_output(self, hidden: torch.Tensor):
        """What a layer returns: the hidden states, and in families whose layers hand the next
        one some state (family.carried), that state too (none, from a stand-in)."""
        return hidden if self.family.carried is None else (hidden, None)

    @contextlib.contextmanager
    def _layers_replaced(self, make_forward) -> Iterator[None]:
        for index, layer in enumerate(self.layers):
            layer.forward = make_forward(index)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def reads_global(self, name: str) -> bool:
        """Whether the forward loads this tensor (by its dense name on disk) outside the
        layers: the embedding, the final norm, the LM head."""
        module = self.module_name(name)
        return not module.startswith("model.layers.") and module in self.global_modules

    @functools.cached_property
    def global_modules(self) -> frozenset[str]:
        """The skeleton's state-dict names (meta tensors: listing them allocates nothing)."""
        return frozenset(self.model.state_dict(keep_vars=True))

    def load_globals(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Embeddings, final norm and LM head (by their names on disk) into the skeleton,
        plus the position-embedding tables transformers computes when it builds a model
        (rebuilt first: a rotary module may hold a stored parameter too, Mistral-Large-4's
        learned RoPE alpha)."""
        self._rebuild_computed_buffers(device)
        state = self.model.state_dict(keep_vars=True)
        named = {self.module_name(n): t for n, t in tensors.items()}
        loaded = {n: t.to(device, state[n].dtype) for n, t in named.items() if n in state}
        self.model.load_state_dict(loaded, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight

    def _rebuild_computed_buffers(self, device: torch.device) -> None:
        """Modules outside the layers whose buffers were computed at construction (rotary
        inv_freq, Gemma's embedding scale) hold nothing on the meta device: build them again
        on the real device."""
        _rebuild_meta_buffers(self.model.model, self.config, device,
                              self.model.model._init_weights, skip="layers")

    def drop_globals(self) -> None:
        """Back to the meta device, freeing the embedding table and the LM head."""
        self.model.to("meta")


class HiddenStream:
    """The calibration (or evaluation) hidden states [N, S, H] of fixed tokens, advanced one
    decoder layer at a time in batches of sequences; each batch gets the arguments the model's
    own forward passes its layers."""

    def __init__(self, decoder: Decoder, tokens: torch.Tensor, device: torch.device):
        self.carried = decoder.family.carried
        # The state each batch hands the next layer, and the one the last layer was given.
        self.state: dict[int, torch.Tensor | None] = {}
        self.state_given: dict[int, torch.Tensor | None] = {}
        batches, self.arguments = [], {}
        for start in range(0, tokens.shape[0], ATTENTION_BATCH):
            chunk = tokens[start:start + ATTENTION_BATCH].to(device)
            first, arguments = decoder.layer_inputs(chunk)
            batches.append(first)
            self.arguments.setdefault(chunk.shape[0], arguments)
        self.hidden = torch.cat(batches)
        self.skeleton_layer = decoder.skeleton_layer

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @torch.no_grad()
    def advance(self, layer: int, module: torch.nn.Module, hidden: torch.Tensor | None = None):
        """Run module (layer `layer`) over hidden (default: the current states) into the
        current states. Given hidden, the layer runs again from its input: it gets the state
        the previous layer handed it, not its own."""
        source = self.hidden if hidden is None else hidden
        for start in range(0, source.shape[0], ATTENTION_BATCH):
            chunk = source[start:start + ATTENTION_BATCH]
            arguments = dict(self.arguments[chunk.shape[0]][self.skeleton_layer(layer)])
            if self.carried is None:
                self.hidden[start:start + ATTENTION_BATCH] = module(chunk, **arguments)
                continue
            if hidden is None:
                self.state_given[start] = self.state.get(start)
            arguments[self.carried] = self.state_given[start]
            self.hidden[start:start + ATTENTION_BATCH], self.state[start] = module(chunk,
                                                                                   **arguments)


def _rebuild_meta_buffers(parent: nn.Module, config, device: torch.device, init,
                          skip: str | None = None) -> None:
    """Each child of parent with meta buffers built again on device from its own config
    (else config); the children of a module list (Granite Swash's rotary embedding per
    RoPE theta) one by one. A module not built from a config (Gemma's scaled embedding) has
    its buffers filled in place by transformers' own initialisation (init), which leaves
    the loaded parameters alone."""
    for name, module in list(parent.named_children()):
        if name == skip or not any(b.is_meta for b in module.buffers(recurse=True)):
            continue
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            _rebuild_meta_buffers(module, config, device, init)
        elif "config" in inspect.signature(type(module)).parameters:
            with torch.device(device):
                setattr(parent, name, type(module)(config=getattr(module, "config", config)))
        else:
            _initialise_buffers(module, device, init)


def _initialise_buffers(module: nn.Module, device: torch.device, init) -> None:
    """module's meta buffers allocated on device and filled by init (a model's
    _init_weights), its parameters marked initialised so init keeps them."""
    for owner in module.modules():
        for key, buffer in list(owner.named_buffers(recurse=False)):
            if buffer.is_meta:
                owner.register_buffer(key, torch.empty_like(buffer, device=device),
                                      persistent=key not in owner._non_persistent_buffers_set)
    for parameter in module.parameters():
        parameter._is_hf_initialized = True
    for owner in module.modules():
        init(owner)


def _experts_prefix(block: str) -> str:
    """The routed experts' state-dict prefix in a layer whose MoE block is at `block` ("":
    the layer itself, as Gemma 4's)."""
    return f"{block}.{EXPERTS_ATTRIBUTE}." if block else f"{EXPERTS_ATTRIBUTE}."


def _moe_path(layer: nn.Module) -> str | None:
    """The path of the block in a layer module that holds routed experts, if any."""
    for path, module in layer.named_modules():
        if isinstance(getattr(module, EXPERTS_ATTRIBUTE, None), nn.Module):
            return path
    return None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def pick_device(device: str) -> torch.device:
    """The device of --device: auto picks CUDA where there is one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
