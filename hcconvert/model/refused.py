"""Model types transformers knows with routed experts that hcconvert refuses, each with its
reason: refused by name before any weight is read (families.family_for), by `inspect` and
`--dry-run` too. README's families table lists them in these words, and a test fails when
transformers gains a MoE configuration that is in neither this table nor the family table
(tests/test_family_coverage.py).
"""

from __future__ import annotations

REFUSED: dict[str, str] = {
    # Not causal language models.
    "switch_transformers": "an encoder-decoder model (T5 with expert-capacity routing), "
                           "not a causal LM",
    "nllb-moe": "an encoder-decoder translation model, not a causal LM",
    "openai_privacy_filter": "a token-classification model, not a causal LM",
    "vitpose_backbone": "a vision (pose-estimation) backbone, not a language model",
    # Not a top-k choice among identical MLP experts.
    "doge": "its experts are rows of two embedding tables picked by product keys "
            "(retrieval experts), not MLP experts",
    "jetmoe": "its attention is a mixture of attention-head experts (MoA) routed beside the "
              "MLP experts, which hcconvert does not reduce",
    "zaya": "its router is an MLP over a router state carried from layer to layer, with a "
            "skip class beside the experts: no per-expert router rows to reduce",
    "deepseek_v4": "its first layers route by token id (hash_moe: a fixed tid2eid table, not "
                   "the router, picks each token's experts), which a merge would have to "
                   "renumber and a prune cannot; and the Hub's experts are FP4, which "
                   "hcconvert does not read",
    "longcat_flash": "zero-computation (identity) experts share the router with the FFN "
                     "experts, and their picks reach the experts as zero-weight dummies: "
                     "hcconvert's routing statistics count only FFN experts' picks",
    "diffusion_gemma": "a diffusion language model (its decoder attends both ways and "
                       "unmasks tokens in parallel), not a causal LM",
    "muse_spark": "its experts work in a projection of the hidden states (pre_expert_proj to "
                  "moe_hidden_size) that the router does not see, which hcconvert's statistics "
                  "and fits, taken on one input for both, do not follow",
    **dict.fromkeys(["inkling_mm_model", "inkling_text"],
                    "its router scores the shared experts too (n_routed + n_shared rows, "
                    "normalised together), which a reduction of one row per routed expert "
                    "does not keep apart"),
    **dict.fromkeys(["inkling2", "inkling2_text"],
                    "its experts' softcapped SwiGLU and the Hub's MXFP8 expert storage are not "
                    "read by hcconvert"),
    **dict.fromkeys(["inkling2_loop", "inkling2_loop_text"],
                    "it runs its middle layers several times per token (loop_num_passes): one "
                    "stored layer serves several places in the forward, which a "
                    "layer-at-a-time calibration does not follow"),
    "dbrx": "its expert count and top-k sit in a nested ffn_config and its experts are stored "
            "as flat [E·F, H] matrices (w1, v1, w2), neither of which the family table "
            "describes",
    "dots3_note": "its vision encoder holds routed experts of its own (per_layer_config) beside "
                  "the text model's, which hcconvert would copy with their experts unreduced; "
                  "its text model alone (dots3_note_text) is supported",
    **dict.fromkeys(["qwen3_omni_moe", "qwen3_omni_moe_thinker"],
                    "its thinker's text model sits below thinker_config.text_config and the "
                    "talker holds a MoE text model of its own: hcconvert reduces one text "
                    "model named by one config level"),
    **dict.fromkeys(["qwen4_exp", "qwen4_exp_text"],
                    "its n-gram embedding is stored in shards that transformers joins on "
                    "loading outside the decoder layers, which hcconvert does not join"),
    "kolibri1_1": "its indexed-attention layers reuse keys and values another layer computed "
                  "(kv_source_layers), which hcconvert's layer-at-a-time forward over batches "
                  "of sequences does not hand over",
    "ergo": "each expert's output passes an RMSNorm of its own (post_expert_norm), which a "
            "merge of two experts' weights does not carry over",
    "ernie4_5_vl_moe": "its layers hold two expert sets (text and vision) in one stored list, "
                       "each with its own router, picked by token modality: hcconvert reduces "
                       "one expert set per layer",
}
