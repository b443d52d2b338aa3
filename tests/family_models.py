"""Tiny random checkpoints of every supported family, saved by transformers itself.

Each case says, independently of hcconvert's family table, where the router and the experts
are on disk, so the tests can rebuild a reference merge from hcconvert.json on their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hcconvert.cli.demo import write_tokenizer

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1}


@dataclass(frozen=True)
class Case:
    model_type: str
    config: dict
    experts_key: str  # as transformers 5 saves it
    router: str  # below model.layers.{layer}.
    experts: tuple[str, ...]  # per-expert templates with {e} (gate, up, down), or fused names
    reduce_to: int  # --experts for the end-to-end test
    fused: bool = False
    router_bias: str | None = None  # a per-expert routing bias below model.layers.{layer}.
    grouped: bool = False  # group-limited routing: merged experts stay within their group
    hub_model_type: str | None = None  # the model_type the Hub's config.json says
    # Keys the Hub's original config.json spells differently: transformers 5 name -> Hub name.
    hub_renames: dict = field(default_factory=dict)
    # A vision-language wrapper's tiny vision config: the text config nests in text_config,
    # and the model loads with AutoModelForImageTextToText.
    vision: dict | None = None
    text_prefix: str = "model."  # the text model's tensors on disk
    # Fused on the Hub, per expert as transformers saves it: the per-expert templates (gate,
    # up, down) the test fuses into `experts` (gate_up, down).
    saved_per_expert: tuple[str, ...] | None = None
    # The attribute of the loaded wrapper whose forward a text-only test runs, where the
    # wrapper's own forward cannot run on text alone (None: the model itself).
    text_forward: str | None = None
    # Where the Hub keeps the multi-token-prediction layer's decoder layer when it is outside
    # the text model (Qwen's mtp.layers.0., with mtp.fc and its norms beside).
    mtp_prefix: str | None = None
    # The transformers class that loads it where no auto class maps its config (Mistral-4's).
    model_class: str | None = None
    # Fused on the Hub as x @ W ([E, H, 2F], [E, F, H]), as transformers reads but does not
    # write them (Qwen3-VL-MoE's): the test transposes what transformers saved.
    hub_transposed: bool = False

    def layer_prefix(self, layer: int) -> str:
        if self.mtp_prefix is not None and layer >= COMMON["num_hidden_layers"]:
            return self.mtp_prefix
        return f"{self.text_prefix}layers.{layer}."

    @property
    def auto_class(self):
        import transformers

        if self.model_class is not None:
            return getattr(transformers, self.model_class)
        return (transformers.AutoModelForCausalLM if self.vision is None
                else transformers.AutoModelForImageTextToText)

    def build(self, config):
        """A random model of config, by the class that loads the case."""
        if self.model_class is not None:
            return self.auto_class._from_config(config)
        return self.auto_class.from_config(config)

    def load(self, directory, **kwargs):
        """The checkpoint as stock transformers loads it, ready for a text-only forward."""
        model = self.auto_class.from_pretrained(directory, **kwargs)
        return model if self.text_forward is None else getattr(model, self.text_forward)


def _per_expert(block: str, gate="gate_proj", up="up_proj", down="down_proj") -> tuple:
    """(gate, up, down) templates, or (up, down) for ungated experts (gate=None)."""
    return tuple(f"{block}.experts.{{e}}.{w}.weight" for w in (gate, up, down) if w)


CASES = {
    "mixtral": Case("mixtral", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24),
        "num_local_experts", "block_sparse_moe.gate.weight",
        _per_expert("block_sparse_moe", "w1", "w3", "w2"), 4),
    "qwen2_moe": Case("qwen2_moe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, intermediate_size=56, mlp_only_layers=[1],
        norm_topk_prob=False), "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    "qwen3_moe": Case("qwen3_moe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0]),
        "num_local_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        hub_renames={"num_local_experts": "num_experts"}),
    # top-k 4 from 8 experts, reduced to 3: top-k must drop to 3.
    "olmoe": Case("olmoe", dict(
        num_experts=8, num_experts_per_tok=4, intermediate_size=24, clip_qkv=2.0,
        norm_topk_prob=False), "num_experts", "mlp.gate.weight", _per_expert("mlp"), 3),
    # V2-Lite's shape: plain q_proj, greedy routing, YaRN with mscale == mscale_all_dim.
    "deepseek_v2_lite": Case("deepseek_v2", dict(
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, first_k_dense_replace=1, n_shared_experts=2, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        num_key_value_heads=4, topk_method="greedy", n_group=1, topk_group=1,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    # V2's shape: q LoRA, group-limited routing with a scaling factor, YaRN's attention factor.
    "deepseek_v2": Case("deepseek_v2", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        num_key_value_heads=4, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    "granitemoe": Case("granitemoe", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24,
        embedding_multiplier=12.0, attention_multiplier=0.1, residual_multiplier=0.22,
        logits_scaling=6.0, tie_word_embeddings=True), "num_local_experts",
        "block_sparse_moe.router.layer.weight",
        ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"), 4,
        fused=True),
}

# DeepSeek-V3's design: sigmoid scores with a correction bias, groups ranked by their top-2
# scores, MLA with q LoRA, YaRN, a shared expert, a first dense layer.
DEEPSEEK_V3 = dict(
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
    first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4, n_group=2,
    topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})
V3_BIAS = "mlp.gate.e_score_correction_bias"
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers 5's own layout
GRANITE = ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")
CASES.update({
    "deepseek_v3": Case("deepseek_v3", DEEPSEEK_V3, "n_routed_experts", "mlp.gate.weight",
                        _per_expert("mlp"), 4, router_bias=V3_BIAS, grouped=True),
    "kimi_k2": Case("deepseek_v3", DEEPSEEK_V3, "n_routed_experts", "mlp.gate.weight",
                    _per_expert("mlp"), 6, router_bias=V3_BIAS, grouped=True,
                    hub_model_type="kimi_k2"),
    # DSA: an indexer of 2 heads keeps 16 keys per query, fewer than the test's sequences.
    "deepseek_v32": Case("deepseek_v32", {**DEEPSEEK_V3, "index_topk": 16, "index_n_heads": 2,
                                          "index_head_dim": 16},
                         "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
                         router_bias=V3_BIAS, grouped=True),
    "glm_moe_dsa": Case("glm_moe_dsa", {**DEEPSEEK_V3, "n_group": 1, "topk_group": 1,
                                        "index_topk": 16, "index_n_heads": 2,
                                        "index_head_dim": 16},
                        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
                        router_bias=V3_BIAS),
    # Mistral-Small-4: DeepSeek-V3's MLA and routing groups on softmax scores without a bias,
    # experts fused as transformers stores them; no auto class maps its config.
    # Llama-4's attention temperature (llama_4_scaling_beta) at positions past 16.
    "mistral4": Case("mistral4", {**DEEPSEEK_V3, "rope_parameters": {
        **YARN, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5,
        "original_max_position_embeddings": 16}}, "n_routed_experts", "mlp.gate.weight",
                     FUSED, 4, fused=True, grouped=True, model_class="Mistral4ForCausalLM"),
    # GLM-4.7-Flash: MLA with q LoRA, one routing group, a first dense layer.
    "glm4_moe_lite": Case("glm4_moe_lite", {**DEEPSEEK_V3, "n_group": 1, "topk_group": 1,
                                            "mlp_layer_types": ["dense", "sparse", "sparse"]},
                          "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
                          router_bias=V3_BIAS),
    # GLM-4.5's shape: partial rotary, QK norm, biased q/k/v, one routing group.
    "glm4_moe": Case("glm4_moe", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, first_k_dense_replace=1, n_shared_experts=1, n_group=1,
        topk_group=1, head_dim=16, partial_rotary_factor=0.5, use_qk_norm=True,
        attention_bias=True, norm_topk_prob=True, routed_scaling_factor=1.5),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 3, router_bias=V3_BIAS),
    "dots1": Case("dots1", dict(
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, first_k_dense_replace=1, n_shared_experts=1, n_group=1,
        topk_group=1, head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.0),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS),
    # MiniMax-M2: the correction bias on the block, partial rotary, QK norm over all heads.
    "minimax_m2": Case("minimax_m2", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24, head_dim=16,
        rotary_dim=8, use_qk_norm=True),
        "num_local_experts", "block_sparse_moe.gate.weight",
        _per_expert("block_sparse_moe", "w1", "w3", "w2"), 4,
        router_bias="block_sparse_moe.e_score_correction_bias"),
    "ernie4_5_moe": Case("ernie4_5_moe", dict(
        moe_num_experts=6, moe_k=2, moe_intermediate_size=24, intermediate_size=56,
        moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=16),
        "moe_num_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.moe_statics.e_score_correction_bias"),
    # GPT-OSS in bf16: fused transposed experts with gate/up interleaved and biases, a
    # clamped SwiGLU (a low limit, so the clamp bites), a router bias, attention sinks,
    # sliding-window layers shorter than the test's sequences, YaRN.
    "gpt_oss": Case("gpt_oss", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24, head_dim=8,
        swiglu_limit=1.5, sliding_window=6, attention_bias=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={**YARN, "rope_theta": 150000.0, "truncate": False}),
        "num_local_experts", "mlp.router.weight",
        ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
         "mlp.experts.down_proj_bias"), 4, fused=True, router_bias="mlp.router.bias"),
    # Phi-3.5-MoE: sparsemixer routing, LongRoPE, biased attention, LayerNorm, an LM head bias.
    "phimoe": Case("phimoe", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24, attention_bias=True,
        lm_head_bias=True, max_position_embeddings=256, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.1, 1.2, 1.3],
                         "long_factor": [1.5, 2.0, 3.0, 4.0], "short_mscale": 1.1,
                         "long_mscale": 1.2, "original_max_position_embeddings": 64}),
        "num_local_experts", "block_sparse_moe.gate.weight",
        _per_expert("block_sparse_moe", "w1", "w3", "w2"), 4),
    # Qwen3.5: a vision tower beside the text model, experts fused on the Hub.
    "qwen3_5_moe": Case("qwen3_5_moe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8), "num_experts", "mlp.gate.weight",
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), 4, fused=True,
        vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                    out_hidden_size=32, patch_size=4, num_position_embeddings=16),
        text_prefix="model.language_model.", saved_per_expert=_per_expert("mlp"),
        mtp_prefix="mtp.layers.0."),
    # Linear-attention (gated DeltaNet) layers beside full attention, a gated shared expert.
    "qwen3_next": Case("qwen3_next", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        shared_expert_intermediate_size=40, head_dim=16, partial_rotary_factor=0.25,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, mlp_only_layers=[2],
        norm_topk_prob=True), "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        mtp_prefix="mtp.layers.0."),
})

CASES.update({
    # A dense first layer, a shared expert averaged in, sigmoid scores, sliding-window layers
    # shorter than the test's sequences, tied embeddings, logit scaling.
    "cohere2_moe": Case("cohere2_moe", dict(
        num_experts=6, num_experts_per_tok=2, intermediate_size=24, num_shared_experts=1,
        shared_expert_combination_strategy="average", expert_selection_fn="sigmoid",
        mlp_layer_types=["dense", "sparse", "sparse"], prefix_dense_intermediate_size=40,
        head_dim=8, sliding_window=6, logit_scale=0.5),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    "flex_olmo": Case("flex_olmo", dict(
        num_experts=6, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    # Lightning (linear) attention in blocks of 8 between softmax-attention layers.
    "minimax": Case("minimax", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24, head_dim=8,
        block_size=8, layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "num_local_experts", "block_sparse_moe.gate.weight",
        _per_expert("block_sparse_moe", "w1", "w3", "w2"), 4),
    # A dense first layer, two shared experts, the selection bias on the block, sliding
    # window layers.
    "afmoe": Case("afmoe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        num_dense_layers=1, num_shared_experts=2, head_dim=8, route_scale=2.0,
        sliding_window=6, global_attn_every_n_layers=2),
        "num_experts", "mlp.router.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.expert_bias"),
    # DeepSeek-V3's routing in two groups, the bias on the block, sliding-window layers.
    "exaone_moe": Case("exaone_moe", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        num_shared_experts=1, n_group=2, topk_group=1, head_dim=8, sliding_window=6,
        sliding_window_pattern=2, mlp_layer_types=["dense", "sparse", "sparse"]),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.e_score_correction_bias", grouped=True),
    "solar_open": Case("solar_open", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_group=2,
        topk_group=1, head_dim=8, routed_scaling_factor=1.5),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS,
        grouped=True),
    "hy_v3": Case("hy_v3", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        num_shared_experts=1, head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"]),
        "num_experts", "mlp.router.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.expert_bias"),
    "kolibri1": Case("kolibri1", dict(
        num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, head_dim=8, sliding_window=6),
        "num_local_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        router_bias="moe.router.expert_bias"),
    # Soft-capped router logits, a routed scaling factor, a dense first layer.
    "laguna": Case("laguna", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        shared_expert_intermediate_size=40, head_dim=8, moe_router_logit_softcapping=3.0,
        moe_routed_scaling_factor=1.5, mlp_layer_types=["dense", "sparse", "sparse"]),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.experts.e_score_correction_bias"),
    "flint": Case("flint", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        shared_expert_intermediate_size=40, head_dim=8, mlp_only_layers=[0]),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    # Sliding-window layers, no shared expert, two routing groups.
    "mimo_v2_flash": Case("mimo_v2_flash", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, n_group=2, topk_group=1, head_dim=8, sliding_window=6,
        mlp_layer_types=["dense", "sparse", "sparse"]),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS,
        grouped=True),
    "minicpm5_moe": Case("minicpm5_moe", dict(
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"]),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS),
    # MLA, routing groups, the block's output normed.
    "axk1": Case("axk1", {**DEEPSEEK_V3, "mlp_layer_types": ["dense", "sparse", "sparse"]},
                 "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
                 router_bias=V3_BIAS, grouped=True),
    # MLA with an indexer of 2 heads keeping 16 keys per query, fewer than the test's
    # sequences; no routing groups.
    "axk2": Case("axk2", {**DEEPSEEK_V3, "n_routed_experts": 6, "n_group": None,
                          "topk_group": None, "index_topk": 16, "index_n_heads": 2,
                          "index_head_dim": 16, "gated_norm_rank": 4,
                          "mlp_layer_types": ["dense", "sparse", "sparse"]},
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS),
    "beam": Case("beam", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        n_group=2, topk_group=1, head_dim=8, sliding_window=6,
        mlp_layer_types=["dense", "sparse", "sparse"]),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS,
        grouped=True),
    "sarvam_mla": Case("sarvam_mla", DEEPSEEK_V3, "n_routed_experts", "mlp.gate.weight",
                       _per_expert("mlp"), 4, router_bias=V3_BIAS, grouped=True,
                       hub_renames={"n_routed_experts": "num_experts"}),
    # Kimi Delta Attention layers (their q/k/v convolutions stored apart, joined by
    # transformers on loading) beside an MLA layer, routing groups, a dense first layer.
    "kimi_linear": Case("kimi_linear", dict(
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=24, intermediate_size=56,
        num_expert_group=2, topk_group=1, num_shared_experts=1, linear_num_heads=2,
        linear_head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, num_key_value_heads=4, first_k_dense_replace=1,
        layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "num_experts", "block_sparse_moe.gate.weight",
        _per_expert("block_sparse_moe", "w1", "w3", "w2"), 4,
        router_bias="block_sparse_moe.gate.e_score_correction_bias", grouped=True),
    # GLM-4.5's model under the original names: a fused q/k/v (split by transformers on
    # loading), QK norms, word_embeddings, the bias as gate.expert_bias; the Hub's config
    # writes num_experts. (Param2 ties its embeddings: in bf16 the tied LM head's large
    # logits round past the tolerance, so both cases keep a head of their own.)
    **{model_type: Case(model_type, dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, n_shared_experts=shared, first_k_dense_replace=1, n_group=2,
        topk_group=1, head_dim=8, tie_word_embeddings=False), "n_routed_experts",
        "mlp.gate.weight", _per_expert("mlp"), 4, router_bias="mlp.gate.expert_bias", grouped=True,
        hub_renames={"n_routed_experts": "num_experts"})
       for model_type, shared in (("sarvam_moe", 1), ("param2moe", 2))},
    # Qwen3-VL-MoE: a vision tower beside the text model, experts fused and transposed on the
    # Hub, interleaved multimodal RoPE, QK norm; text_config ties embeddings, the wrapper not.
    "qwen3_vl_moe": Case("qwen3_vl_moe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        "num_local_experts", "mlp.gate.weight", FUSED, 4, fused=True,
        vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                    out_hidden_size=32, patch_size=4, num_position_embeddings=16,
                    deepstack_visual_indexes=[0]),
        text_prefix="model.language_model.", hub_transposed=True,
        hub_renames={"num_local_experts": "num_experts"}),
    # GLM-4.5V: GLM-4.5's text model (biased q/k/v, routing groups, a dense first layer) beside
    # a vision tower, 3D RoPE.
    "glm4v_moe": Case("glm4v_moe", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
        topk_group=1, head_dim=16, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS,
        grouped=True, vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                  out_hidden_size=32, patch_size=4),
        text_prefix="model.language_model."),
    # Nemotron-H: a Mamba-2 layer, MoE layers with ungated relu² experts, an attention layer,
    # everything below backbone.
    "nemotron_h": Case("nemotron_h", dict(
        num_hidden_layers=4, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, moe_shared_expert_intermediate_size=40, n_group=2,
        topk_group=1, head_dim=8, layers_block_type=["mamba", "moe", "attention", "moe"],
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
        routed_scaling_factor=1.5), "n_routed_experts", "mixer.gate.weight",
        _per_expert("mixer", gate=None), 4, router_bias="mixer.gate.e_score_correction_bias",
        grouped=True, text_prefix="backbone."),
    "hunyuan_v1_moe": Case("hunyuan_v1_moe", dict(
        num_experts=6, moe_topk=2, intermediate_size=24, head_dim=8),
        "num_experts", "mlp.gate.wg.weight", _per_expert("mlp"), 4),
    # Mamba layers 1 and 3 (the first and last attention), MoE in layers 1 and 3.
    "jamba": Case("jamba", dict(
        num_hidden_layers=4, num_experts=6, num_experts_per_tok=2, intermediate_size=24,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
        attn_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        use_mamba_kernels=False), "num_experts", "feed_forward.router.weight",
        _per_expert("feed_forward"), 4),
    # Short-convolution layers beside an attention layer, a dense first layer, tied
    # embeddings.
    "lfm2_moe": Case("lfm2_moe", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=56,
        num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
        routed_scaling_factor=1.5), "num_experts", "feed_forward.gate.weight",
        _per_expert("feed_forward", "w1", "w3", "w2"), 4, router_bias="feed_forward.expert_bias"),
    # Granite 4: a shared MLP beside the experts; with sliding-window layers; with Mamba-2
    # layers.
    "granitemoeshared": Case("granitemoeshared", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24,
        shared_intermediate_size=40, embedding_multiplier=12.0, attention_multiplier=0.1,
        residual_multiplier=0.22, logits_scaling=6.0), "num_local_experts",
        "block_sparse_moe.router.layer.weight", GRANITE, 4, fused=True),
    "granitemoe_swa": Case("granitemoe_swa", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24,
        shared_intermediate_size=40, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "num_local_experts", "block_sparse_moe.router.weight",
        ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"), 4,
        fused=True),
    "granitemoehybrid": Case("granitemoehybrid", dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24,
        shared_intermediate_size=40, layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=8), "num_local_experts", "block_sparse_moe.router.layer.weight",
        GRANITE, 4, fused=True),
    # Hy-V4: hyper-connections (4 residual streams), indexed MLA keeping 16 keys, attention
    # sinks, routing groups, experts with a clamped SiLU whose clamp bites (limit 1.5).
    "hy_v4": Case("hy_v4", {**DEEPSEEK_V3, "head_dim": 8, "index_topk": 16, "index_n_heads": 2,
                            "index_head_dim": 16, "swiglu_limit": 1.5,
                            "mlp_layer_types": ["dense", "sparse", "sparse"]},
                  "n_routed_experts", "mlp.gate.weight", FUSED, 4, fused=True,
                  router_bias=V3_BIAS, grouped=True),
    # GLM-5-Next: Kimi Delta Attention (its q/k/v convolutions joined on loading) and indexed
    # MLA keeping 16 keys, hyper-connections, routing groups, a clamped SiLU that bites, a
    # vision tower beside.
    "glm5_next": Case("glm5_next", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, v_head_dim=8, index_topk=16, index_n_heads=2, index_head_dim=16,
        linear_head_dim=8, linear_num_heads=2, swiglu_limit=1.5, n_group=2, topk_group=1,
        mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4, router_bias=V3_BIAS,
        grouped=True, vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                  out_hidden_size=32, patch_size=4),
        text_prefix="model.language_model."),
    "mellum": Case("mellum", dict(
        num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, head_dim=8), "num_local_experts", "mlp.gate.weight",
        _per_expert("mlp"), 4),
    # Qwen3.5's text model on its own, per expert as transformers saves it.
    "qwen3_5_moe_text": Case("qwen3_5_moe_text", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8), "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4),
    # Aria: fused experts as x @ W, a shared expert; the vision-language checkpoint under
    # language_model.
    **{name: Case(model_type, dict(
        moe_num_experts=6, moe_topk=2, intermediate_size=24, moe_num_shared_experts=1,
        head_dim=8), "moe_num_experts", "mlp.router.weight",
        ("mlp.experts.fc1.weight", "mlp.experts.fc2.weight"), 4, fused=True, **wrapper)
       for name, model_type, wrapper in [
           ("aria_text", "aria_text", {}),
           ("aria", "aria", dict(
               vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
               text_prefix="language_model.model."))]},
    # MiniMax-M3: a clamped SwiGLU that bites (limit 1.5), sparse block attention; the
    # vision-language checkpoint per expert under language_model., the text model fused.
    **{name: Case(model_type, dict(
        num_local_experts=6, num_experts_per_tok=2, intermediate_size=24,
        shared_intermediate_size=40, dense_intermediate_size=56, head_dim=8,
        index_topk_blocks=2, swiglu_limit=1.5), "num_local_experts", **layout, reduce_to=4,
        **wrapper)
       for name, model_type, layout, wrapper in [
           ("minimax_m3_vl_text", "minimax_m3_vl_text",
            dict(router="mlp.gate.weight", experts=FUSED, fused=True, router_bias=V3_BIAS), {}),
           ("minimax_m3_vl", "minimax_m3_vl",
            dict(router="block_sparse_moe.gate.weight",
                 experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
                 router_bias="block_sparse_moe.e_score_correction_bias"),
            dict(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=16, patch_size=4),
                 text_prefix="language_model.model."))]},
    # dots.llm3's text model: MLA with an indexer keeping 16 keys, routing groups.
    "dots3_note_text": Case("dots3_note_text", {**DEEPSEEK_V3, "head_dim": 16, "index_topk": 16,
                                                "index_n_heads": 2, "index_head_dim": 16,
                                                "shared_experts_intermediate_size": 24,
                                                "mlp_layer_types": ["dense", "sparse", "sparse"]},
                            "n_routed_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
                            router_bias=V3_BIAS, grouped=True),
    # Hy-V4-VL: Hy-V4's text model beside a vision tower, 3D RoPE.
    "hy_v4_vl": Case("hy_v4_vl", {**DEEPSEEK_V3, "head_dim": 8, "index_topk": 16,
                                  "index_n_heads": 2, "index_head_dim": 16, "swiglu_limit": 1.5,
                                  "mlp_layer_types": ["dense", "sparse", "sparse"],
                                  "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
                                                      "mrope_section": [2, 1, 1]}},
                     "n_routed_experts", "mlp.gate.weight", FUSED, 4, fused=True,
                     router_bias=V3_BIAS, grouped=True,
                     vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 out_hidden_size=32, patch_size=4)),
    # Ling-2.5: Kimi Delta Attention beside an MLA layer, routing groups, the experts of
    # layer 1 clamped after the SiLU (the clamp bites at 1.5), of layer 2 not.
    "bailing_hybrid": Case("bailing_hybrid", dict(
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=24, intermediate_size=56,
        num_expert_group=2, topk_group=1, head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4, first_k_dense_replace=1,
        layer_group_size=2, expert_swiglu_limit_list=[0, 1.5, 0], num_mtp_layers=0),
        "num_experts", "mlp.gate.weight", _per_expert("mlp"), 4,
        router_bias="mlp.gate.expert_bias", grouped=True),
    # Step-3.7: experts stacked per projection, the clamp after the SiLU biting in layer 1,
    # gated attention heads, a dense first layer, a vision tower beside.
    "step3p7": Case("step3p7", dict(
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, share_expert_dim=40, head_dim=8, swiglu_limits=[0, 1.5, 0],
        sliding_window=6,
        mlp_layer_types=["dense", "sparse", "sparse"]), "n_routed_experts", "moe.gate.weight",
        ("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight"), 4, fused=True,
        router_bias="moe.router_bias",
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=4,
                    max_position_embeddings=16)),
    # Gemma 4: a MoE block beside every layer's MLP, on the layer itself, sliding-window
    # layers shorter than the test's sequences, tied embeddings; the vision-language model
    # with its text model under model.language_model.
    **{name: Case(model_type, dict(
        enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=24,
        intermediate_size=56, head_dim=8, global_head_dim=8, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        hidden_size_per_layer_input=0), "num_experts", "router.proj.weight",
        ("experts.gate_up_proj", "experts.down_proj"), 4, fused=True,
        router_bias="router.per_expert_scale", **wrapper)
       for name, model_type, wrapper in [
           ("gemma4_text", "gemma4_text", {}),
           ("gemma4", "gemma4", dict(
               vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                           patch_size=4, position_embedding_size=16),
               text_prefix="model.language_model."))]},
    # Lara-4-Mini: gated-DeltaNet layers whose fused in_proj transformers splits on loading.
    "lara_mini": Case("lara_mini", dict(
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "num_experts", "mlp.gate.weight", FUSED, 4, fused=True),
    # Mistral-Large-4 in Mistral's own format: MLA with an indexer keeping 16 keys, softmax
    # routing groups, a dense first layer, a Pixtral vision tower beside.
    "mistral_large4": Case("mistral_large4", {
        **DEEPSEEK_V3, "head_dim": 16, "index_topk": 16, "index_n_heads": 2,
        "index_head_dim": 16, "mlp_layer_types": ["dense", "sparse", "sparse"],
        "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "llama_4_scaling_beta": 0.5, "original_max_position_embeddings": 16}},
        "n_routed_experts", "gate.weight", ("experts.{e}.w1.weight", "experts.{e}.w3.weight",
                                            "experts.{e}.w2.weight"), 4, grouped=True,
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=4, head_dim=8),
        text_prefix=""),
    # DeepSeek-OCR-2 and Unlimited-OCR: a DeepSeek-V2-style text model (shared experts, a
    # dense first layer; Unlimited-OCR's with sliding-window reference attention) beside SAM
    # and a second vision encoder.
    **{model_type: Case(model_type, dict(
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=56, n_shared_experts=1, head_dim=8, num_key_value_heads=4,
        mlp_layer_types=["dense", "sparse", "sparse"], **text), "n_routed_experts",
        "mlp.gate.weight", _per_expert("mlp"), 4,
        vision=dict(sam_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=32, patch_size=4,
                                    window_size=2, global_attn_indexes=[0], mlp_dim=32,
                                    downsample_channels=[16, 32]),
                    encoder_config=dict(hidden_size=32, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        **encoder)))
       for model_type, text, encoder in [
           ("deepseek_ocr2", {}, dict(num_key_value_heads=2, vocab_size=300)),
           ("unlimited_ocr", dict(layer_types=["reference_sliding_attention"] * 3),
            dict(image_size=16, patch_size=4))]},
})

# Llama-4 (Scout's design at 4 layers): MoE layers 1 and 3 between dense ones (intermediate_size
# for the routed and shared experts, intermediate_size_mlp for the dense MLPs), a top-1 sigmoid
# router scaling the expert's input, NoPE layers 1 and 3 with temperature tuning that bites
# (floor_scale below the sequence length), chunked attention shorter than the test's
# sequences, QK norm.
LLAMA4 = dict(num_hidden_layers=4, num_local_experts=6, num_experts_per_tok=1,
              intermediate_size=24, intermediate_size_mlp=56, interleave_moe_layer_step=2,
              head_dim=8, no_rope_layer_interval=2, attention_chunk_size=8, use_qk_norm=True,
              floor_scale=8, attn_scale=0.5)
LLAMA4_EXPERTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
CASES.update({
    "llama4_text": Case("llama4_text", LLAMA4, "num_local_experts", "feed_forward.router.weight",
                        LLAMA4_EXPERTS, 4, fused=True),
    # The vision-language checkpoint: the text model under language_model.model., its LM head
    # at language_model.lm_head.
    "llama4": Case("llama4", LLAMA4, "num_local_experts", "feed_forward.router.weight",
                   LLAMA4_EXPERTS, 4, fused=True,
                   vision=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, vision_output_dim=32, image_size=16,
                               patch_size=4, projector_input_dim=32, projector_output_dim=32),
                   text_prefix="language_model.model.",
                   # transformers 5.24's Llama4ForConditionalGeneration.forward reads
                   # image_outputs from its language model's output, which has none.
                   text_forward="language_model"),
})

# Keys the Hub's DeepSeek-V2 config.json carries that transformers 5 does not write.
HUB_EXTRAS = {"deepseek_v2": {"scoring_func": "softmax", "moe_layer_freq": 1, "seq_aux": True,
                              "aux_loss_alpha": 0.001},
              "gpt_oss": {"experts_per_token": 2, "initial_context_length": 128}}


def save_family_model(case: Case, directory: Path, dtype=torch.float32, hub_style=False,
                      seed=0, fused_layers: range | list[int] | None = None) -> Path:
    """A random model of the case's family saved by transformers in several shards, with a
    byte tokenizer, its experts in the Hub's layout (fused_layers: the layers to fuse, default
    all, where the Hub fuses them). hub_style rewrites config.json as the Hub's original
    repos write it."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory)
    text = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                **{**COMMON, **case.config})
    config = (AutoConfig.for_model(case.model_type, **text) if case.vision is None else
              AutoConfig.for_model(case.model_type, text_config=text, vision_config=case.vision))
    model = case.build(config).to(dtype)
    spread_weights(model)
    model.save_pretrained(directory, max_shard_size="40KB")
    if case.saved_per_expert is not None:
        fuse_experts(case, directory, range(COMMON["num_hidden_layers"])
                     if fused_layers is None else fused_layers)
    if case.hub_transposed:
        transpose_experts(case, directory)
    if hub_style:
        hub_style_config(case, directory)
    if case.hub_model_type:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()),
                                    "model_type": case.hub_model_type}, indent=2))
    return directory


def fuse_experts(case: Case, directory: Path, layers) -> None:
    """Rewrite the per-expert tensors transformers saved in `layers` as the Hub's fused
    [E, 2F, H] gate_up and [E, H, F] down, in the shard that held expert 0's gate."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    shards = {name: load_file(directory / name) for name in set(weight_map.values())}
    gate, up, down = case.saved_per_expert

    def stacked(prefix: str, template: str) -> torch.Tensor:
        names = [prefix + template.format(e=e) for e in range(case.config["num_experts"])]
        return torch.stack([shards[weight_map.pop(n)].pop(n) for n in names])

    for layer in layers:
        prefix = case.layer_prefix(layer)
        home = weight_map.get(prefix + gate.format(e=0))
        if home is None:  # a dense layer
            continue
        gate_up_name, down_name = case.experts
        fused = {gate_up_name: torch.cat((stacked(prefix, gate), stacked(prefix, up)), dim=1),
                 down_name: stacked(prefix, down)}
        for name, tensor in fused.items():
            shards[home][prefix + name] = tensor
            weight_map[prefix + name] = home
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def transpose_experts(case: Case, directory: Path) -> None:
    """The fused experts transformers saved ([E, 2F, H], [E, H, F]) as the Hub stores them
    transposed ([E, H, 2F], [E, F, H])."""
    for shard in directory.glob("*.safetensors"):
        tensors = load_file(shard)
        fused = {name for name in tensors if name.endswith(case.experts)}
        if fused:
            tensors.update({name: tensors[name].transpose(1, 2).contiguous() for name in fused})
            save_file(tensors, str(shard), metadata={"format": "pt"})


def spread_weights(model) -> None:
    """transformers' init (std 0.02, unit norms) makes experts' outputs tiny and alike and
    every norm a no-op; spread weights and norms so mistakes show."""
    with torch.no_grad():
        biases = [(n, b) for n, b in model.named_buffers() if "e_score_correction_bias" in n]
        for name, p in [*model.named_parameters(), *biases]:
            if "e_score_correction_bias" in name:  # a buffer in some families
                p.normal_(0, 0.3)
                continue
            if "embed" in name:
                p.normal_(0, 1)
            elif p.dim() >= 2:
                router = name.endswith(("mlp.gate.weight", "router.weight"))
                p.normal_(0, p.shape[-1] ** -0.5 * (4 if router else 1))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)  # biases


def hub_style_config(case: Case, directory: Path) -> None:
    """rope_theta/rope_scaling and torch_dtype instead of rope_parameters and dtype."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if case.vision is not None:  # written by transformers 5 already, but for key names
        config["text_config"] = {case.hub_renames.get(k, k): v
                                 for k, v in config["text_config"].items()}
        path.write_text(json.dumps(config, indent=2))
        return
    # RoPE per layer type (Laguna's) has no older spelling: the Hub writes it as it is.
    if "rope_type" in config.get("rope_parameters", {}):
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        rope.pop("type", None)
        config["rope_scaling"] = {"type": rope_type, **rope} if rope_type != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    for old, new in case.hub_renames.items():
        config[new] = config.pop(old)
    config.update(HUB_EXTRAS.get(case.model_type, {}))
    path.write_text(json.dumps(config, indent=2))


MTP_SHARD = "model-mtp.safetensors"
# Qwen's MTP tensors beside its decoder layer, below mtp. (vLLM's qwen3_next_mtp.py).
QWEN_MTP_OWN = ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "fc.weight",
                "norm.weight")


def add_mtp_layer(directory: Path, seed: int = 1, with_copies: bool = True) -> int:
    """Append a multi-token-prediction layer as DeepSeek-V3's checkpoints store it (transformers
    saves none): at index num_hidden_layers, a MoE decoder layer (the last layer's tensors,
    redrawn) plus enorm, hnorm, eh_proj [H, 2H] and shared_head.norm, and with_copies the
    embedding and LM head copies DeepSeek-V3's layer 61 carries. Returns the layer's index."""
    config, weights = _config_and_weights(directory)
    layer, hidden = config["num_hidden_layers"], config["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{layer}."
    mtp = _redrawn_layer(weights, f"model.layers.{layer - 1}.", prefix, generator)
    own = {"enorm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator),
           "hnorm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator),
           "eh_proj.weight": _projection(hidden, generator),
           "shared_head.norm.weight": 1 + 0.2 * torch.randn(hidden, generator=generator)}
    if with_copies:
        own["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
        own["shared_head.head.weight"] = weights["lm_head.weight"]
    dtype = weights["model.norm.weight"].dtype
    mtp.update({prefix + name: t.to(dtype) for name, t in own.items()})
    _save_mtp(directory, mtp, {**config, "num_nextn_predict_layers": 1})
    return layer


def add_qwen_mtp_layer(case: Case, directory: Path, seed: int = 1) -> int:
    """Append the MTP layer Qwen3-Next's and Qwen3.5's Hub checkpoints carry: a full-attention
    MoE decoder layer at mtp.layers.0 (the last full-attention layer's tensors, redrawn; its
    experts per expert, as the Hub stores them) and mtp.fc [H, 2H], mtp.pre_fc_norm_embedding,
    mtp.pre_fc_norm_hidden and mtp.norm (zero-centred norms: the scale is 1 + weight). Qwen3.5's
    config.json declares mtp_num_hidden_layers, Qwen3-Next's nothing. Returns the layer's
    index as hcconvert.json gives it (num_hidden_layers)."""
    config, weights = _config_and_weights(directory)
    text = config.get("text_config", config)
    hidden = text["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    source = max(i for i, kind in enumerate(text["layer_types"]) if kind == "full_attention")
    mtp = _redrawn_layer(_per_expert_layer(case, weights, source), case.layer_prefix(source),
                         case.mtp_prefix, generator)
    own = {name: 0.2 * torch.randn(hidden, generator=generator) for name in QWEN_MTP_OWN}
    own["fc.weight"] = _projection(hidden, generator)
    dtype = weights[case.text_prefix + "norm.weight"].dtype
    mtp.update({"mtp." + name: t.to(dtype) for name, t in own.items()})
    if case.vision is not None:
        config = {**config, "text_config": {**text, "mtp_num_hidden_layers": 1}}
    _save_mtp(directory, mtp, config)
    return text["num_hidden_layers"]


def _per_expert_layer(case: Case, weights: dict, layer: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s tensors with fused experts split per expert (gate rows first)."""
    prefix = case.layer_prefix(layer)
    tensors = {n: t for n, t in weights.items() if n.startswith(prefix)}
    if case.saved_per_expert is None or prefix + case.experts[0] not in tensors:
        return tensors
    gate_up, down = (tensors.pop(prefix + name) for name in case.experts)
    ffn = down.shape[-1]
    for e in range(gate_up.shape[0]):
        for template, tensor in zip(case.saved_per_expert,
                                    (gate_up[e, :ffn], gate_up[e, ffn:], down[e]), strict=True):
            tensors[prefix + template.format(e=e)] = tensor.contiguous()
    return tensors


def _config_and_weights(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(directory / shard))
    return json.loads((directory / "config.json").read_text()), weights


def _redrawn_layer(weights: dict, source: str, target: str,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The tensors below `source`, renamed below `target`, each with as much noise again."""
    def redrawn(tensor: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(tensor.shape, generator=generator)
        return (tensor.float() + tensor.float().std() * noise).to(tensor.dtype)

    return {target + name.removeprefix(source): redrawn(tensor)
            for name, tensor in weights.items() if name.startswith(source)}


def _projection(hidden: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(hidden, 2 * hidden, generator=generator) * (2 * hidden) ** -0.5


def _save_mtp(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """The MTP tensors in a shard of their own, indexed, and config.json rewritten."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file(tensors, str(directory / MTP_SHARD), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, MTP_SHARD))
    index_path.write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
