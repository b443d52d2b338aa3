"""Model families as data: where each MoE keeps its routed experts and router on disk, which
config keys hold the expert count and top-k, and how its router scores experts.

Tensor names are suffixes below a decoder layer's prefix (`model.layers.{layer}.`, or the
text model's prefix inside a vision-language wrapper); `{expert}` stands for the expert index.
Everything else in a layer is transformers' business (decoder.py): its modules say which layers
are MoE, what attention they run and which tensors they load.

Config keys are the ones the Hub's config.json files write; where transformers 5 saves a key
under another name (Qwen3-MoE's expert count), the family lists both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import UserError
from .activation import (
    Activation,
    clamped_silu,
    clamped_swiglu,
    gelu_tanh,
    relu2,
    silu,
    silu_clamped_per_layer,
)
from .config_checks import MAX_EXPERTS, MAX_WIDTH, check_config, check_model_type
from .layouts import (
    NEXTN,
    ExpertLayout,
    ExpertNames,
    Fused,
    MtpLayout,
    PerExpert,
    RoutingGroups,
    Stacked,
    group_limited,
    no_groups,
    qwen_mtp,
)
from .refused import REFUSED
from .tiktoken_vocab import TiktokenVocab


def _per_expert(block: str, gate: str | None = "gate_proj", up: str = "up_proj",
                down: str = "down_proj") -> PerExpert:
    return PerExpert(_mlp(f"{block}.experts.{{expert}}", gate, up, down))


def _mlp(module: str, gate: str | None = "gate_proj", up: str = "up_proj",
         down: str = "down_proj") -> ExpertNames:
    return ExpertNames(gate and f"{module}.{gate}.weight", f"{module}.{up}.weight",
                       f"{module}.{down}.weight")


@dataclass(frozen=True)
class Family:
    """One model_type: where its routed experts and router are on disk, which config keys say
    what, and how the router scores experts. Everything else in a layer (attention, norms,
    dense MLPs, shared experts) is loaded by name into transformers' own modules."""

    model_type: str
    experts_keys: tuple[str, ...]  # config keys of the routed-expert count: the keys we rewrite
    experts: ExpertLayout  # below the layer prefix
    router: str  # the router's [E, H] weight, below the layer prefix
    # A per-expert router bias ([E], or [1, E]) that is reduced with the router's rows.
    router_bias: str | None = None
    top_k_key: str = "num_experts_per_tok"
    # Other keys of the Hub's config.json that repeat the top-k, rewritten with it.
    top_k_mirrors: tuple[str, ...] = ()
    ffn_key: str = "moe_intermediate_size"  # config key of one routed expert's ffn size
    scoring: str = "softmax"  # "softmax" or "sigmoid": how the router turns logits to scores
    # A config key that names the scoring where the model can do either (Cohere2-MoE's).
    scoring_key: str | None = None
    routing_groups: Callable[[dict], RoutingGroups | None] = no_groups
    transformers_type: str | None = None  # model_type transformers knows it by, if another
    text_config_key: str | None = None  # a vision-language wrapper's text config
    text_prefix: str = "model."  # the text model's tensors on disk
    # The keyword by which a layer is given the state the layer before it returned beside its
    # hidden states (GLM-5's indexer top-k, shared between layers).
    carried: str | None = None
    # Whether greedy continuations may run through transformers' cache one token a step. False
    # where the cached step was not shown to pick the full forward's token (multimodal position
    # ids, lightning attention, hyper-connections...): each step then recomputes the sequence.
    cached_generation: bool = True
    # The experts' activation, from the transformers config and the layer (activation.py).
    activation: Callable[[object, int], Activation] = silu
    # How the tokenizer reads tiktoken.model, where the Hub ships it and no tokenizer.json.
    tiktoken: TiktokenVocab | None = None
    # The router picks top_k experts whatever config.json says (Phi-3.5-MoE's sparsemixer
    # always picks two): a reduction must keep at least that many.
    fixed_top_k: bool = False
    # Other layouts a checkpoint may store a layer's experts in (re-saves, MTP layers).
    other_layouts: tuple[ExpertLayout, ...] = ()
    # Where the LM head sits on disk, before `lm_head.` (a wrapper's `language_model.`).
    head_prefix: str = ""
    # The MoE block calls experts(routed_in) with every token's input already scaled by its
    # router score (Llama-4), not experts(x, index, weights): experts.PrescaledExperts adapts.
    prescaled_inputs: bool = False
    mtp: MtpLayout = NEXTN  # where a multi-token-prediction layer would be stored
    # The token embedding's name on disk where it is not the text model's embed_tokens.
    embedding_name: str | None = None
    # Where the MoE block is the whole decoder layer (Gemma 4's), the module below the layer
    # that routes on its own (router(x) -> (scores, weights, index)), x what it reads.
    router_module: str | None = None
    # The model_type whose checkpoint conversions transformers keeps on the vision-language
    # wrapper although they rename the text model's tensors (MiniMax-M3's).
    wrapper_mapping: str | None = None
    # What of a config the family's entry cannot reduce, as a phrase (None: nothing): a
    # variant of the family whose experts or routing differ from the entry's.
    unsupported: Callable[[dict], str | None] = lambda text: None

    @property
    def config_ranges(self) -> dict[str, tuple[int, int]]:
        """The least and greatest value of each integer config key this entry names (the
        expert count, top-k and expert width), for config_checks."""
        counts = {key: (1, MAX_EXPERTS)
                  for key in (*self.experts_keys, self.top_k_key, *self.top_k_mirrors)}
        return {**counts, self.ffn_key: (1, MAX_WIDTH)}

    @property
    def router_tensors(self) -> tuple[str, ...]:
        """The router's weight and per-expert bias (below the layer prefix): one row or entry
        per expert, reduced with the experts."""
        return (self.router,) + ((self.router_bias,) if self.router_bias else ())

    def top_k_of(self, text: dict):
        """The top-k this (text) config says, under the family's key or a mirror of it
        (Step-3.5's original moe_top_k); None when it says none."""
        return next((text[key] for key in (self.top_k_key, *self.top_k_mirrors)
                     if text.get(key) is not None), None)

    def scoring_of(self, text: dict) -> str:
        """How the router scores experts under this (text) config."""
        return text.get(self.scoring_key, self.scoring) if self.scoring_key else self.scoring

    def experts_key(self, config: dict) -> str | None:
        """The expert-count key this config.json uses (None when it has none)."""
        text = self.text_config(config)
        return next((k for k in self.experts_keys if text.get(k)), None)

    def stored_layout(self, names: Collection[str]) -> ExpertLayout:
        """How one layer stores its experts, from its tensor names below the layer prefix:
        the first layout whose marker tensor is there, else the family's own (whose names a
        missing-tensor message then gives)."""
        return next((layout for layout in (self.experts, *self.other_layouts)
                     if layout.marker in names), self.experts)

    def text_config(self, config: dict) -> dict:
        """The text model's config: config.json itself, or its nested text config."""
        if self.text_config_key is None:
            return config
        nested = config.get(self.text_config_key)
        if not isinstance(nested, dict):
            raise UserError(f"config.json has no {self.text_config_key} for the text model")
        return nested

    def text_name(self, name: str) -> str:
        """A tensor's name as the text-only transformers model calls it."""
        if name.startswith(self.text_prefix):
            return "model." + name.removeprefix(self.text_prefix)
        if self.head_prefix and name.startswith(self.head_prefix + "lm_head."):
            return name.removeprefix(self.head_prefix)
        return name

    @property
    def embedding(self) -> str:
        """The token embedding table's name on disk."""
        return self.embedding_name or f"{self.text_prefix}embed_tokens.weight"

    @property
    def lm_head(self) -> str:
        """The LM head's name on disk (absent where the embedding is tied to it)."""
        return f"{self.head_prefix}lm_head.weight"

    @property
    def layers_prefix(self) -> str:
        """What every decoder layer's tensor names start with."""
        return f"{self.text_prefix}layers."

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}{layer}."


DEEPSEEK_V3_GROUPS = group_limited(min_per_group=2)  # groups ranked by their top-2 scores


# Kimi-K2's tokenizer (TikTokenTokenizer in the repos' tokenization_kimi.py, remote code we
# do not run): its split pattern, then 256 reserved special tokens and two more.
KIMI_TIKTOKEN = TiktokenVocab(pattern="|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]), special_tokens=258)


DEEPSEEK_V3_BIAS = "mlp.gate.e_score_correction_bias"


def _deepseek_v3(model_type: str, **changes) -> Family:
    """DeepSeek-V3's design: sigmoid scores, a selection-only correction bias, groups."""
    design = dict(experts_keys=("n_routed_experts",), experts=_per_expert("mlp"),
                  router="mlp.gate.weight", router_bias=DEEPSEEK_V3_BIAS,
                  scoring="sigmoid", routing_groups=DEEPSEEK_V3_GROUPS)
    return Family(model_type=model_type, **{**design, **changes})


def _latent_experts(text: dict) -> str | None:
    """Nemotron-H's latent MoE (moe_latent_size): the experts see a projection of the hidden
    states the router does not, and the statistics, router fits and layer fits are taken on
    one input for both."""
    if text.get("moe_latent_size"):
        return (f"moe_latent_size={text['moe_latent_size']}: the routed experts work on a "
                "latent projection of the router's input, which hcconvert does not reduce")
    return None


def _shared_keys_and_values(text: dict) -> str | None:
    """Layers that reuse another layer's keys and values (kv_source_layers): the layer-at-a-
    time forward runs every layer over each batch of sequences in turn, so the source's keys
    for that batch are gone when a later layer would read them."""
    sources = text.get("kv_source_layers") or []
    if any(source != layer for layer, source in enumerate(sources)):
        return ("kv_source_layers: layers reuse the keys and values of earlier layers, which "
                "hcconvert's layer-at-a-time forward does not hand over")
    return None


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        Family(model_type="mixtral", experts_keys=("num_local_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight", ffn_key="intermediate_size"),
        Family(model_type="qwen2_moe", experts_keys=("num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight"),
        # The Hub writes num_experts; transformers 5 saves it as num_local_experts.
        Family(model_type="qwen3_moe", experts_keys=("num_experts", "num_local_experts"),
               experts=_per_expert("mlp"), router="mlp.gate.weight"),
        Family(model_type="olmoe", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.gate.weight", ffn_key="intermediate_size"),
        Family(model_type="deepseek_v2", experts_keys=("n_routed_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight",
               routing_groups=group_limited("topk_method", "group_limited_greedy")),
        # Granite 3 (granitemoe) and Granite 4 (a shared MLP beside; Mamba-2 layers between
        # attention ones): the experts fused as input_linear [E, 2F, H] and output_linear
        # [E, H, F].
        *[Family(model_type=model_type, experts_keys=("num_local_experts",),
                 experts=Fused("block_sparse_moe.input_linear.weight",
                               "block_sparse_moe.output_linear.weight"),
                 router="block_sparse_moe.router.layer.weight", ffn_key="intermediate_size")
          for model_type in ("granitemoe", "granitemoeshared", "granitemoehybrid")],
        # Granite Swash (sliding-window layers): transformers 5's own names, which it reads
        # the checkpoints by.
        Family(model_type="granitemoe_swa", experts_keys=("num_local_experts",),
               experts=Fused("block_sparse_moe.experts.gate_up_proj",
                             "block_sparse_moe.experts.down_proj"),
               router="block_sparse_moe.router.weight", ffn_key="intermediate_size"),
        _deepseek_v3("deepseek_v3"),
        # Kimi-K2's config.json says kimi_k2 (remote code); its text model is DeepSeek-V3's.
        _deepseek_v3("kimi_k2", transformers_type="deepseek_v3", tiktoken=KIMI_TIKTOKEN),
        # Kimi-K2.5: a vision-language wrapper around Kimi-K2's text model, which sits under
        # language_model. (its LM head too) with the text config nested.
        _deepseek_v3("kimi_k25", transformers_type="deepseek_v3", text_config_key="text_config",
                     text_prefix="language_model.model.", head_prefix="language_model.",
                     tiktoken=KIMI_TIKTOKEN),
        _deepseek_v3("glm4_moe"),
        _deepseek_v3("glm4_moe_lite"),  # GLM-4.7-Flash: DeepSeek-V3's MLA and routing
        # DeepSeek-V3.2 and GLM-5's sparse attention (DSA): an indexer keeps each query's
        # index_topk best keys; transformers' own attention module computes it exactly at
        # any calibration length (all keys while the sequence is no longer than index_topk).
        _deepseek_v3("deepseek_v32"),
        _deepseek_v3("glm_moe_dsa", carried="prev_topk_indices"),
        _deepseek_v3("dots1"),
        # Cohere's: softmax over the top-k logits or sigmoid scores (expert_selection_fn), a
        # shared expert summed or averaged in, dense layers first.
        Family(model_type="cohere2_moe", experts_keys=("num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight", ffn_key="intermediate_size",
               scoring_key="expert_selection_fn"),
        Family(model_type="flex_olmo", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.gate.weight", ffn_key="intermediate_size"),
        # MiniMax-Text-01 / M1: lightning-attention layers between softmax ones.
        Family(model_type="minimax", experts_keys=("num_local_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight", ffn_key="intermediate_size",
               cached_generation=False),
        # Arcee's AFMoE (Trinity): a sigmoid router whose selection-only bias sits on the block.
        Family(model_type="afmoe", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.router.gate.weight", router_bias="mlp.expert_bias",
               scoring="sigmoid"),
        # K-EXAONE: DeepSeek-V3's routing with the correction bias on the block.
        _deepseek_v3("exaone_moe", experts_keys=("num_experts",),
                     router_bias="mlp.e_score_correction_bias"),
        _deepseek_v3("solar_open"),  # Solar-Open: DeepSeek-V3's routing, GQA attention
        # Hy3: sigmoid top-k with a selection-only bias on the block, no groups.
        Family(model_type="hy_v3", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.router.gate.weight", router_bias="mlp.expert_bias",
               scoring="sigmoid"),
        # Kolibri-1: the top-k of logits plus a bias stored outside the MoE block.
        Family(model_type="kolibri1", experts_keys=("num_local_experts", "num_experts"),
               experts=_per_expert("mlp"), router="mlp.gate.weight",
               router_bias="moe.router.expert_bias", scoring="sigmoid"),
        # Laguna: sigmoid scores (soft-capped logits), the bias stored among the experts.
        Family(model_type="laguna", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.gate.weight", router_bias="mlp.experts.e_score_correction_bias",
               scoring="sigmoid"),
        # Flint: sigmoid top-k without a bias, a shared expert, dense first layers.
        Family(model_type="flint", experts_keys=("num_experts",), experts=_per_expert("mlp"),
               router="mlp.gate.weight", scoring="sigmoid"),
        # DeepSeek-V3's routing and layout under other attention: MiMo-V2-Flash (sliding
        # window, no shared expert), MiniCPM5-MoE, A.X-K1 (MLA, a norm after the block),
        # A.X-K2 (indexed attention), Beam (no shared expert), Sarvam-105B (MLA; the Hub
        # writes num_experts).
        _deepseek_v3("mimo_v2_flash"),
        _deepseek_v3("minicpm5_moe"),
        _deepseek_v3("axk1"),
        _deepseek_v3("axk2"),
        _deepseek_v3("beam", experts_keys=("num_experts",)),
        _deepseek_v3("sarvam_mla", experts_keys=("num_experts", "n_routed_experts")),
        # Kimi-Linear: Kimi Delta Attention layers beside MLA ones, DeepSeek-V3's routing
        # under the keys of its original config (num_experts_per_token, num_expert_group).
        Family(model_type="kimi_linear", experts_keys=("num_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight",
               router_bias="block_sparse_moe.gate.e_score_correction_bias",
               top_k_key="num_experts_per_token", scoring="sigmoid",
               routing_groups=group_limited(min_per_group=2, count_key="num_expert_group"),
               tiktoken=KIMI_TIKTOKEN),
        # Sarvam-30B and Param2: GLM-4.5's model under the original checkpoints' names (a
        # fused q/k/v transformers splits, word_embeddings, the bias as gate.expert_bias).
        *[_deepseek_v3(model_type, experts_keys=("num_experts", "n_routed_experts"),
                       router_bias="mlp.gate.expert_bias",
                       embedding_name="model.word_embeddings.weight")
          for model_type in ("sarvam_moe", "param2moe")],
        # Qwen3-VL-MoE: the text model under model.language_model., experts fused as x @ W
        # (transformers 5 reads them so, and writes them untransposed).
        Family(model_type="qwen3_vl_moe", experts_keys=("num_experts", "num_local_experts"),
               experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                             transposed=True),
               router="mlp.gate.weight", text_config_key="text_config",
               text_prefix="model.language_model.", cached_generation=False),
        # GLM-4.5V: GLM-4.5's text model under model.language_model., a vision tower beside.
        _deepseek_v3("glm4v_moe", text_config_key="text_config",
                     text_prefix="model.language_model.", cached_generation=False),
        # Nemotron-H (Nemotron 3): Mamba-2 and attention layers between MoE layers whose
        # experts are ungated (down(relu(up x))²), below backbone.
        Family(model_type="nemotron_h", experts_keys=("n_routed_experts",),
               experts=_per_expert("mixer", gate=None), router="mixer.gate.weight",
               router_bias="mixer.gate.e_score_correction_bias", scoring="sigmoid",
               routing_groups=DEEPSEEK_V3_GROUPS, activation=relu2, text_prefix="backbone.",
               embedding_name="backbone.embeddings.weight", unsupported=_latent_experts),
        # Hunyuan-A13B: a softmax router under gate.wg, a shared MLP; moe_topk is its top-k.
        Family(model_type="hunyuan_v1_moe", experts_keys=("num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.wg.weight", top_k_key="moe_topk",
               ffn_key="intermediate_size"),
        # Jamba: Mamba layers between attention ones, MoE every other layer.
        Family(model_type="jamba", experts_keys=("num_experts",),
               experts=_per_expert("feed_forward"), router="feed_forward.router.weight",
               ffn_key="intermediate_size"),
        # LFM2-MoE: short-convolution layers beside attention ones, sigmoid scores with a
        # selection-only bias on the block.
        Family(model_type="lfm2_moe", experts_keys=("num_experts",),
               experts=_per_expert("feed_forward", "w1", "w3", "w2"),
               router="feed_forward.gate.weight", router_bias="feed_forward.expert_bias",
               scoring="sigmoid"),
        # Hy-V4 (Tencent): hyper-connections (hc_mult residual streams) around indexed MLA
        # whose top-k a layer hands the next, DeepSeek-V3's routing, experts fused with a
        # clamped SiLU (swiglu_limit).
        # Hy-V4-VL: the same text model (under model., as on its own), the vision tower at vit.
        *[_deepseek_v3(model_type, experts=Fused("mlp.experts.gate_up_proj",
                                                 "mlp.experts.down_proj"),
                       activation=clamped_silu, carried="prev_topk_indices", **wrapper)
          for model_type, wrapper in [("hy_v4", {}),
                                      ("hy_v4_vl", dict(text_config_key="text_config",
                                                       cached_generation=False))]],
        # GLM-5-Next: a vision-language wrapper whose text model mixes Kimi Delta Attention
        # layers with indexed MLA (the top-k handed on), under hyper-connections; experts
        # with a clamped SiLU.
        _deepseek_v3("glm5_next", text_config_key="text_config",
                     text_prefix="model.language_model.", activation=clamped_silu,
                     carried="prev_topk_indices", cached_generation=False),
        # Mellum: a softmax router over per-expert tensors.
        Family(model_type="mellum", experts_keys=("num_local_experts", "num_experts"),
               experts=_per_expert("mlp"), router="mlp.gate.weight"),
        # Aria: experts fused as x @ W under fc1 [E, H, 2F] and fc2 [E, F, H], a shared
        # expert; the vision-language checkpoint keeps the text model under language_model.
        *[Family(model_type=model_type, experts_keys=("moe_num_experts",),
                 experts=Fused("mlp.experts.fc1.weight", "mlp.experts.fc2.weight",
                               transposed=True),
                 router="mlp.router.weight", top_k_key="moe_topk", ffn_key="intermediate_size",
                 **wrapper)
          for model_type, wrapper in [
              ("aria_text", {}),
              ("aria", dict(text_config_key="text_config", text_prefix="language_model.model.",
                            head_prefix="language_model."))]],
        # MiniMax-M3: sigmoid routing with a correction bias, a shared expert, GPT-OSS's
        # clamped SwiGLU on gate-first experts. The vision-language checkpoint stores them per
        # expert as MiniMax-M2 does, under language_model.; the text model on its own in
        # transformers 5's fused layout.
        Family(model_type="minimax_m3_vl", experts_keys=("num_local_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight",
               router_bias="block_sparse_moe.e_score_correction_bias",
               ffn_key="intermediate_size", scoring="sigmoid", activation=clamped_swiglu,
               text_config_key="text_config", text_prefix="language_model.model.",
               head_prefix="language_model.", wrapper_mapping="minimax_m3_vl"),
        Family(model_type="minimax_m3_vl_text", experts_keys=("num_local_experts",),
               experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
               router="mlp.gate.weight", router_bias=DEEPSEEK_V3_BIAS,
               ffn_key="intermediate_size", scoring="sigmoid", activation=clamped_swiglu),
        # dots.llm3's text model: DeepSeek-V3's MLA, indexer and routing.
        _deepseek_v3("dots3_note_text"),
        # Ling-2.5 (bailing_hybrid): Kimi Delta Attention layers (their q/k/v convolutions
        # joined on loading) beside MLA ones, DeepSeek-V3's routing under its original keys
        # (as Kimi-Linear), the bias as gate.expert_bias, experts clamped per layer after the
        # SiLU (expert_swiglu_limit_list).
        Family(model_type="bailing_hybrid", experts_keys=("num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight",
               router_bias="mlp.gate.expert_bias", top_k_key="num_experts_per_token",
               scoring="sigmoid",
               routing_groups=group_limited(min_per_group=2, count_key="num_expert_group"),
               activation=silu_clamped_per_layer,
               embedding_name="model.word_embeddings.weight"),
        # Step-3.7 (vision-language; its text model is Step-3.5's): experts stacked per
        # projection under moe., a sigmoid router with its bias beside, SiLU clamped per layer
        # after the activation; the text model below model. as on its own. The original
        # config's keys (moe_num_experts, moe_top_k) and transformers 5's are both read.
        Family(model_type="step3p7", experts_keys=("moe_num_experts", "n_routed_experts"),
               experts=Stacked("moe.gate_proj.weight", "moe.up_proj.weight",
                               "moe.down_proj.weight"),
               router="moe.gate.weight", router_bias="moe.router_bias",
               top_k_mirrors=("moe_top_k",), scoring="sigmoid",
               activation=silu_clamped_per_layer, text_config_key="text_config",
               wrapper_mapping="step3p7", cached_generation=False),
        # Gemma 4 (26B-A4B): every layer's MLP beside a MoE block that is the decoder layer
        # itself (router and experts on the layer); the router reads the residual through its
        # own norm and scale, the experts a normed copy; GeGLU experts fused as transformers
        # stores them; each routed weight times the expert's per_expert_scale.
        *[Family(model_type=model_type, experts_keys=("num_experts",),
                 experts=Fused("experts.gate_up_proj", "experts.down_proj"),
                 router="router.proj.weight", router_bias="router.per_expert_scale",
                 top_k_key="top_k_experts", activation=gelu_tanh, router_module="router",
                 **wrapper)
          for model_type, wrapper in [
              ("gemma4_text", {}),
              ("gemma4", dict(text_config_key="text_config",
                              text_prefix="model.language_model."))]],
        # Lara-4-Mini: gated-DeltaNet layers (their fused in_proj split by transformers on
        # loading) beside attention, a shared expert, experts fused as transformers stores them.
        Family(model_type="lara_mini", experts_keys=("num_experts",),
               experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
               router="mlp.gate.weight"),
        # Mistral-Large-4 (vision-language) in Mistral's own format, which transformers reads
        # by the wrapper's renamings: layers.{L}.experts.{e}.w1/w3/w2, layers.{L}.gate,
        # tok_embeddings, output; MLA with an indexer, softmax routing groups (Mistral-4's).
        Family(model_type="mistral_large4", experts_keys=("n_routed_experts",),
               experts=PerExpert(_mlp("experts.{expert}", "w1", "w3", "w2")),
               router="gate.weight", routing_groups=DEEPSEEK_V3_GROUPS,
               text_config_key="text_config", text_prefix="",
               embedding_name="tok_embeddings.weight", wrapper_mapping="mistral_large4",
               carried="prev_topk_indices", unsupported=_shared_keys_and_values,
               cached_generation=False),
        # DeepSeek-OCR-2 and Unlimited-OCR: a DeepSeek-V2-style text model (softmax routing,
        # shared experts) below model. beside SAM and a second vision encoder.
        *[Family(model_type=model_type, experts_keys=("n_routed_experts",),
                 experts=_per_expert("mlp"), router="mlp.gate.weight",
                 routing_groups=group_limited("topk_method", "group_limited_greedy"),
                 text_config_key="text_config", cached_generation=False)
          for model_type in ("deepseek_ocr2", "unlimited_ocr")],
        # Mistral-Small-4's text model: DeepSeek-V3's attention and routing groups, softmax
        # scores without a correction bias, the experts fused as transformers 5 stores them.
        Family(model_type="mistral4", experts_keys=("n_routed_experts",),
               experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
               router="mlp.gate.weight", routing_groups=DEEPSEEK_V3_GROUPS),
        Family(model_type="minimax_m2", experts_keys=("num_local_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight",
               # MiniMax keeps the correction bias on the block, not on the gate.
               router_bias="block_sparse_moe.e_score_correction_bias",
               ffn_key="intermediate_size", scoring="sigmoid"),
        Family(model_type="ernie4_5_moe", experts_keys=("moe_num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight",
               router_bias="mlp.moe_statics.e_score_correction_bias",
               top_k_key="moe_k"),
        # Gated-DeltaNet linear-attention layers beside full attention: transformers' modules.
        Family(model_type="qwen3_next", experts_keys=("num_experts",),
               experts=_per_expert("mlp"), router="mlp.gate.weight",
               mtp=qwen_mtp("num_nextn_predict_layers")),
        # GPT-OSS: experts fused as x @ W with gate/up interleaved and biases, a clamped
        # SwiGLU, a router bias. The Hub's MXFP4 matrices are read as these weights
        # (quantization.Mxfp4 dequantizes to the transpose of what it stores).
        Family(model_type="gpt_oss", experts_keys=("num_local_experts",),
               experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                             transposed=True, interleaved=True,
                             gate_up_bias="mlp.experts.gate_up_proj_bias",
                             down_bias="mlp.experts.down_proj_bias"),
               router="mlp.router.weight", router_bias="mlp.router.bias",
               top_k_mirrors=("experts_per_token",),  # OpenAI's name, in the Hub's config
               ffn_key="intermediate_size", activation=clamped_swiglu),
        # Phi-3.5-MoE: sparsemixer routing, which always picks two experts.
        Family(model_type="phimoe", experts_keys=("num_local_experts",),
               experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
               router="block_sparse_moe.gate.weight", ffn_key="intermediate_size",
               fixed_top_k=True),
        # Llama-4's text model (Scout, Maverick): fused experts as x @ W (gate columns first),
        # a top-1 sigmoid router whose score scales the expert's input, a shared expert, MoE
        # layers interleaved with dense ones, NoPE and chunked-attention layers, QK norm.
        *[Family(model_type=model_type, experts_keys=("num_local_experts",),
                 experts=Fused("feed_forward.experts.gate_up_proj",
                               "feed_forward.experts.down_proj", transposed=True),
                 router="feed_forward.router.weight", ffn_key="intermediate_size",
                 scoring="sigmoid", prescaled_inputs=True, **wrapper)
          for model_type, wrapper in [
              ("llama4_text", {}),
              # The vision-language checkpoint: the text model and its LM head under
              # language_model., the text config under text_config.
              ("llama4", dict(text_config_key="text_config",
                              text_prefix="language_model.model.",
                              head_prefix="language_model."))]],
        # A vision-language wrapper; the official checkpoints fuse the experts, re-saves (and
        # MTP layers) store them per expert: each layer is written back as it was read. Its
        # text model on its own (qwen3_5_moe_text) likewise, below model.
        *[Family(model_type=model_type, experts_keys=("num_experts",),
                 experts=Fused("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                 other_layouts=(_per_expert("mlp"),), router="mlp.gate.weight",
                 mtp=qwen_mtp("mtp_num_hidden_layers"), **wrapper)
          for model_type, wrapper in [
              ("qwen3_5_moe", dict(text_config_key="text_config",
                                   text_prefix="model.language_model.")),
              ("qwen3_5_moe_text", {})]],
    ]
}


def family_for(config: dict) -> Family:
    """The family of config.json's model_type, after its values are checked (config_checks)."""
    check_model_type(config)
    model_type = config.get("model_type")
    if model_type in REFUSED:
        raise UserError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not a supported MoE family "
                        f"(supported: {supported_families()})")
    family = FAMILIES[model_type]
    check_config(config, family.text_config_key, family.config_ranges)
    if family.experts_key(config) is None:
        raise UserError(f"config.json has no {' or '.join(family.experts_keys)}: "
                        "not a MoE checkpoint")
    return family


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))
