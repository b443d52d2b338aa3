"""What one conversion needs to know about a model, read from its config.json and the layer
structure transformers builds from it, before any weight is read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..io.quantization import quant_format
from ..io.source import Checkpoint, open_checkpoint
from .decoder import Decoder
from .families import Family, family_for
from .layouts import RoutingGroups


@dataclass(frozen=True)
class Routing:
    """How a token picks its experts, as far as a reduction must respect it."""

    top_k: int
    scoring: str  # "softmax" or "sigmoid"
    groups: RoutingGroups | None = None  # group-limited routing (DeepSeek)


@dataclass(frozen=True)
class ModelSpec:
    """The geometry and routing of a model, and its decoder skeleton."""

    family: Family
    config: dict  # config.json as read
    num_layers: int
    hidden: int
    num_experts: int
    ffn: int  # one routed expert's intermediate size
    routing: Routing
    moe_layers: tuple[int, ...]
    # The indices config.json gives multi-token-prediction layers (num_nextn_predict_layers),
    # stored after the decoder layers; a checkpoint may leave them out.
    mtp_layers: tuple[int, ...] = ()

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def reduces(self, layer: int) -> bool:
        """Whether a layer's routed experts are reduced: a MoE decoder layer's, or an MTP
        layer's (its decoder layer is a MoE layer)."""
        return layer in self.moe_layers or layer in self.mtp_layers

    def layer_prefix(self, layer: int) -> str:
        """Where a layer's tensors are on disk: a decoder layer's, or an MTP layer's decoder
        layer's (below the text model's layers, or outside the text model: Qwen's mtp.)."""
        mtp = self.family.mtp
        if layer in self.mtp_layers and mtp.layer_prefix is not None:
            return mtp.layer_prefix.format(depth=layer - self.num_layers)
        return self.family.layer_prefix(layer)

    def layer_of(self, name: str) -> int | None:
        """The index of the layer a tensor belongs to (MTP layers after the decoder layers),
        None outside every layer; a layer beyond the declared ones is refused."""
        mtp = self.family.mtp
        apart = mtp.layer_prefix is not None  # MTP layers outside the text model's layers
        # (prefix, index of its first layer, how many layers it holds)
        where = [(self.family.layers_prefix, 0,
                  self.num_layers + (0 if apart else len(self.mtp_layers)))]
        if apart:
            where.append((mtp.layer_prefix.split("{depth}")[0], self.num_layers,
                          len(self.mtp_layers)))
        for prefix, first, count in where:
            if not name.startswith(prefix):
                continue
            index = name.removeprefix(prefix).split(".")[0]
            if not index.isdigit() or int(index) >= count:
                declared = (f" + {mtp.count_key}={len(self.mtp_layers)}" if self.mtp_layers
                            else "")
                raise UserError(f"tensor {name} is beyond num_hidden_layers={self.num_layers}"
                                f"{declared}")
            return first + int(index)
        return None

    def global_names(self, names: Iterable[str]) -> list[str]:
        """The tensors outside every layer (embeddings, norm, head, an MTP layer's own
        tensors stored apart, a vision tower), in order: what a conversion copies."""
        return [name for name in names if self.layer_of(name) is None]

    def mtp_own_prefix(self, layer: int) -> str:
        """Where MTP layer `layer`'s own tensors (its norms and projection) are on disk."""
        own = self.family.mtp.own_prefix
        return self.layer_prefix(layer) if own is None else own

    @classmethod
    def from_config(cls, config: dict, family: Family) -> ModelSpec:
        quant_format(config)  # an unknown or malformed quantization method is refused here
        text = family.text_config(config)
        decoder = Decoder(config, family)
        layers = len(decoder.layers)
        spec = cls(
            family=family,
            config=config,
            num_layers=layers,
            hidden=_required(text, "hidden_size"),
            num_experts=text[family.experts_key(config)],
            ffn=_required(text, family.ffn_key),
            routing=Routing(_top_k(text, family), family.scoring_of(text),
                            family.routing_groups(text)),
            moe_layers=tuple(i for i in range(layers) if decoder.moe_block(i) is not None),
            mtp_layers=tuple(range(layers, layers + _mtp_count(text, family))),
        )
        unsupported = family.unsupported(text)
        if unsupported is not None:
            raise UserError(f"config.json: {unsupported}")
        if not 1 <= spec.top_k <= spec.num_experts:
            raise UserError(f"config.json asks for top-{spec.top_k} routing over "
                            f"{spec.num_experts} experts")
        if family.prescaled_inputs and spec.top_k != 1:
            # With top-k > 1 a token reaches its experts with k differently scaled inputs.
            raise UserError(f"config.json asks for top-{spec.top_k} routing; hcconvert reads "
                            f"{family.model_type}'s router-scaled expert inputs with top-1 "
                            "routing only (as Llama-4 Scout and Maverick route)")
        return spec

    def decoder(self, dtype: torch.dtype = torch.float32) -> Decoder:
        """The transformers skeleton whose layers compute in dtype."""
        return Decoder(self.config, self.family, dtype)


def _mtp_count(text: dict, family: Family) -> int:
    """How many MTP layers config.json declares, or the family's default where it is silent
    (Qwen3-Next's config.json has no count; vLLM assumes one)."""
    count = text.get(family.mtp.count_key)
    return family.mtp.default_count if count is None else count or 0


def _top_k(text: dict, family: Family) -> int:
    top_k = family.top_k_of(text)
    if top_k is None:
        raise UserError(f"config.json has no {family.top_k_key}")
    return top_k


def _required(config: dict, key: str):
    if config.get(key) is None:
        raise UserError(f"config.json has no {key}")
    return config[key]


def open_source(src: str, revision: str | None = None,
                low_disk: bool = False) -> tuple[Checkpoint, ModelSpec]:
    """SRC and its model: a local directory, or a Hub repo whose shards are downloaded just in
    time (remote.HubFiles)."""
    ckpt = open_checkpoint(src, revision, low_disk)
    return ckpt, ModelSpec.from_config(ckpt.config, family_for(ckpt.config))
