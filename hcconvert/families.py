"""Model families as data: tensor names, config keys and routing flags of each supported MoE.

Tensor names are suffixes below a decoder layer's prefix (`model.layers.{layer}.`), so a
layer's tensors load into a dict keyed by the suffixes below. `{expert}` stands for the expert
index. Code appears only where a table cannot say it (which layers are MoE).
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
    return layer not in config.get("mlp_only_layers", []) and (layer + 1) % step == 0


@dataclass(frozen=True)
class ExpertNames:
    """Per-expert tensor names of a routed MoE block (gate, up and down projections)."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    model_type: str
    experts_key: str  # config key of the routed-expert count, the one key we rewrite
    top_k_key: str
    ffn_key: str  # config key of one expert's intermediate size
    router: str
    experts: ExpertNames
    # Top-k weights renormalised to sum to one: a fixed answer, or the config key that says.
    renormalize: bool | str = True
    shared_expert: ExpertNames | None = None
    shared_expert_gate: str | None = None  # sigmoid gate scaling the shared expert's output
    dense_mlp: ExpertNames = ExpertNames("mlp.gate_proj.weight", "mlp.up_proj.weight",
                                         "mlp.down_proj.weight")
    attention_bias: bool = False  # q/k/v projections carry a bias
    qk_norm: str | None = None  # None, "head" (per-head RMSNorm) or "proj" (whole projection)
    is_moe_layer: Callable[[dict, int], bool] = every_layer

    def renormalizes(self, config: dict) -> bool:
        if isinstance(self.renormalize, bool):
            return self.renormalize
        return bool(config.get(self.renormalize, False))


def _per_expert(block: str, gate: str, up: str, down: str) -> ExpertNames:
    prefix = f"{block}.experts.{{expert}}."
    return ExpertNames(f"{prefix}{gate}.weight", f"{prefix}{up}.weight", f"{prefix}{down}.weight")


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        Family(
            model_type="mixtral",
            experts_key="num_local_experts",
            top_k_key="num_experts_per_tok",
            ffn_key="intermediate_size",
            router="block_sparse_moe.gate.weight",
            experts=_per_expert("block_sparse_moe", "w1", "w3", "w2"),
        ),
    ]
}


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UserError(f"model_type {model_type!r} is not a supported MoE family "
                        f"(supported: {supported})")
    family = FAMILIES[model_type]
    if not config.get(family.experts_key):
        raise UserError(f"config.json has no {family.experts_key}: not a MoE checkpoint")
    return family
