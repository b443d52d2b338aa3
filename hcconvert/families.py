"""Model families as data: tensor names, config keys and routing flags of each supported MoE.

Tensor names are suffixes below a decoder layer's prefix (`model.layers.{layer}.`), so a
layer's tensors load into a dict keyed by the suffixes below. `{expert}` stands for the expert
index. Code appears only where a table cannot say it (which layers are MoE).

Config keys are the ones the Hub's config.json files write; where transformers 5 saves a key
under another name (Qwen3-MoE's expert count), the family lists both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

LAYER_PREFIX = "model.layers.{layer}."


def every_layer(config: dict, layer: int) -> bool:
    return True


def qwen_sparse_layer(config: dict, layer: int) -> bool:
    """Qwen MoE: every `decoder_sparse_step`-th layer, minus `mlp_only_layers`."""
    step = config.get("decoder_sparse_step", 1) or 1
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def deepseek_sparse_layer(config: dict, layer: int) -> bool:
    """DeepSeek: dense MLPs below `first_k_dense_replace`, then every `moe_layer_freq`-th layer."""
    freq = config.get("moe_layer_freq", 1) or 1
    return layer >= config.get("first_k_dense_replace", 0) and layer % freq == 0


@dataclass(frozen=True)
class ConfigFlag:
    """A yes/no setting read from config.json, with the default its transformers config uses."""

    key: str
    default: bool


def read_flag(config: dict, flag: bool | ConfigFlag) -> bool:
    if isinstance(flag, bool):
        return flag
    value = config.get(flag.key)
    return flag.default if value is None else bool(value)


@dataclass(frozen=True)
class ExpertNames:
    """A SwiGLU MLP's gate, up and down projections (an expert, a shared expert, a dense MLP)."""

    gate: str
    up: str
    down: str

    def all(self) -> list[str]:
        return [self.gate, self.up, self.down]


@dataclass(frozen=True)
class PerExpert:
    """Routed experts stored one tensor per projection per expert: gate, up [F, H], down [H, F]."""

    names: ExpertNames  # each name holds `{expert}`
    description = "per-expert tensors"

    def shapes(self, count: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Every stored tensor of `count` experts, name -> shape, in write order."""
        shape = {self.names.gate: (ffn, hidden), self.names.up: (ffn, hidden),
                 self.names.down: (hidden, ffn)}
        return {template.format(expert=e): dims for e in range(count)
                for template, dims in shape.items()}

    def prefixes(self) -> tuple[str, ...]:
        """Name prefixes that only routed-expert tensors have."""
        return tuple(dict.fromkeys(name.split("{expert}")[0] for name in self.names.all()))


@dataclass(frozen=True)
class Fused:
    """Routed experts stacked on disk: gate_up [E, 2F, H] (gate rows first), down [E, H, F]."""

    gate_up: str
    down: str
    description = "fused tensors (gate_up [E, 2F, H], down [E, H, F])"

    def shapes(self, count: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return {self.gate_up: (count, 2 * ffn, hidden), self.down: (count, hidden, ffn)}

    def prefixes(self) -> tuple[str, ...]:
        return (self.gate_up, self.down)


ExpertLayout = PerExpert | Fused


def _per_expert(block: str, gate: str = "gate_proj", up: str = "up_proj",
                down: str = "down_proj") -> PerExpert:
    return PerExpert(_mlp(f"{block}.experts.{{expert}}", gate, up, down))


def _mlp(module: str, gate: str = "gate_proj", up: str = "up_proj",
         down: str = "down_proj") -> ExpertNames:
    return ExpertNames(f"{module}.{gate}.weight", f"{module}.{up}.weight",
                       f"{module}.{down}.weight")


@dataclass(frozen=True)
class Family:
    """One model_type: where its tensors are, which config keys say what, how it routes."""

    model_type: str
    experts_keys: tuple[str, ...]  # config keys of the routed-expert count: the keys we rewrite
    top_k_key: str
    ffn_key: str  # config key of one routed expert's intermediate size
    router: str
    experts: ExpertLayout
    # Top-k weights renormalised to sum to one.
    renormalize: bool | ConfigFlag = True
    shared_expert: ExpertNames | None = None
    shared_expert_gate: str | None = None  # sigmoid gate scaling the shared expert's output
    dense_mlp: ExpertNames = _mlp("mlp")  # the MLP of non-MoE layers
    attention: str = "gqa"  # "gqa" (q/k/v/o projections) or "mla" (DeepSeek latent attention)
    attention_bias: bool | ConfigFlag = False  # the projections below carry a bias
    biased_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    qk_norm: str | None = None  # None, "head" (per-head RMSNorm) or "proj" (whole projection)
    routed_scaling_key: str | None = None  # config key of a factor on the top-k weights
    # DeepSeek's topk_method "group_limited_greedy": experts form n_group contiguous groups and
    # a token picks its top-k among the topk_group groups holding its best-scoring experts.
    group_routing: bool = False
    fp32_router: bool = False  # router logits computed in fp32 whatever the weights' dtype
    is_moe_layer: Callable[[dict, int], bool] = every_layer

    def experts_key(self, config: dict) -> str | None:
        """The expert-count key this config.json uses (None when it has none)."""
        return next((k for k in self.experts_keys if config.get(k)), None)


NORM_TOPK = ConfigFlag("norm_topk_prob", False)
ATTENTION_BIAS = ConfigFlag("attention_bias", False)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        Family(
            model_type="mixtral",
            experts_keys=("num_local_experts",),
            top_k_key="num_experts_per_tok",
            ffn_key="intermediate_size",
            router="block_sparse_moe.gate.weight",
            experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
        ),
        Family(
            model_type="qwen2_moe",
            experts_keys=("num_experts",),
            top_k_key="num_experts_per_tok",
            ffn_key="moe_intermediate_size",
            router="mlp.gate.weight",
            experts=_per_expert("mlp"),
            renormalize=NORM_TOPK,
            shared_expert=_mlp("mlp.shared_expert"),
            shared_expert_gate="mlp.shared_expert_gate.weight",
            attention_bias=ConfigFlag("qkv_bias", True),  # the Hub's configs omit it: biased
            biased_projections=("q_proj", "k_proj", "v_proj"),
            is_moe_layer=qwen_sparse_layer,
        ),
        Family(
            model_type="qwen3_moe",
            # The Hub writes num_experts; transformers 5 saves it as num_local_experts.
            experts_keys=("num_experts", "num_local_experts"),
            top_k_key="num_experts_per_tok",
            ffn_key="moe_intermediate_size",
            router="mlp.gate.weight",
            experts=_per_expert("mlp"),
            renormalize=NORM_TOPK,
            attention_bias=ATTENTION_BIAS,
            qk_norm="head",
            is_moe_layer=qwen_sparse_layer,
        ),
        Family(
            model_type="olmoe",
            experts_keys=("num_experts",),
            top_k_key="num_experts_per_tok",
            ffn_key="intermediate_size",
            router="mlp.gate.weight",
            experts=_per_expert("mlp"),
            renormalize=NORM_TOPK,
            attention_bias=ATTENTION_BIAS,
            qk_norm="proj",
        ),
        Family(
            model_type="deepseek_v2",
            experts_keys=("n_routed_experts",),
            top_k_key="num_experts_per_tok",
            ffn_key="moe_intermediate_size",
            router="mlp.gate.weight",
            experts=_per_expert("mlp"),
            # transformers' DeepseekV2 never renormalises (every released V2 has
            # norm_topk_prob false); it scales the top-k weights instead.
            renormalize=False,
            shared_expert=_mlp("mlp.shared_experts"),
            attention="mla",
            routed_scaling_key="routed_scaling_factor",
            group_routing=True,
            fp32_router=True,
            is_moe_layer=deepseek_sparse_layer,
        ),
        Family(
            model_type="granitemoe",
            experts_keys=("num_local_experts",),
            top_k_key="num_experts_per_tok",
            ffn_key="intermediate_size",
            router="block_sparse_moe.router.layer.weight",
            experts=Fused("block_sparse_moe.input_linear.weight",
                          "block_sparse_moe.output_linear.weight"),
            # softmax over the top-k logits: the same weights as renormalised top-k softmax
            renormalize=True,
            attention_bias=ATTENTION_BIAS,
        ),
    ]
}


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not a supported MoE family "
                        f"(supported: {supported_families()})")
    family = FAMILIES[model_type]
    if family.experts_key(config) is None:
        raise UserError(f"config.json has no {' or '.join(family.experts_keys)}: "
                        "not a MoE checkpoint")
    return family


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))
