"""Where a MoE keeps its routed experts and its multi-token-prediction layer on disk, and
how group-limited routing groups its experts: the layouts the family table (families.py)
names. T tokens, H hidden, E experts, F expert ffn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertNames:
    """One expert's gate, up and down projection names; ungated experts (Nemotron-H's) have
    no gate."""

    gate: str | None
    up: str
    down: str

    def all(self) -> list[str]:
        return [name for name in (self.gate, self.up, self.down) if name is not None]

    def stacked(self, experts) -> list[tuple[str, object]]:
        """(name, stacked tensor) for each projection of experts (an experts.Experts)."""
        return [(name, tensor) for name, tensor in ((self.gate, experts.gate),
                                                    (self.up, experts.up),
                                                    (self.down, experts.down))
                if name is not None]


@dataclass(frozen=True)
class PerExpert:
    """Routed experts stored one tensor per projection per expert: gate, up [F, H], down [H, F]."""

    names: ExpertNames  # each name holds `{expert}`
    description = "per-expert tensors"

    def shapes(self, count: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Every stored tensor of `count` experts, name -> shape, in write order."""
        shape = {name: (ffn, hidden) for name in (self.names.gate, self.names.up) if name}
        shape[self.names.down] = (hidden, ffn)
        return {template.format(expert=e): dims for e in range(count)
                for template, dims in shape.items()}

    def prefixes(self) -> tuple[str, ...]:
        """Name prefixes that only routed-expert tensors have."""
        return tuple(dict.fromkeys(name.split("{expert}")[0] for name in self.names.all()))

    @property
    def biases(self) -> tuple[str, ...]:
        """The stored expert biases: none."""
        return ()

    @property
    def marker(self) -> str:
        """A tensor every layer stored this way has."""
        return self.names.all()[0].format(expert=0)


@dataclass(frozen=True)
class Fused:
    """Routed experts stacked on disk: gate_up [E, 2F, H] (gate rows first), down [E, H, F];
    GPT-OSS stores them transposed (x @ W: [E, H, 2F], [E, F, H]), gate and up interleaved
    (gate at even positions of 2F), with biases gate_up [E, 2F] and down [E, H]."""

    gate_up: str
    down: str
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None

    @property
    def description(self) -> str:
        if self.transposed:
            return "fused tensors, transposed (gate_up [E, H, 2F], down [E, F, H])"
        return "fused tensors (gate_up [E, 2F, H], down [E, H, F])"

    def shapes(self, count: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
        gate_up, down = (hidden, 2 * ffn), (ffn, hidden)
        shapes = {self.gate_up: (count, *(gate_up if self.transposed else gate_up[::-1])),
                  self.down: (count, *(down if self.transposed else down[::-1]))}
        if self.gate_up_bias is not None:
            shapes[self.gate_up_bias] = (count, 2 * ffn)
        if self.down_bias is not None:
            shapes[self.down_bias] = (count, hidden)
        return shapes

    def prefixes(self) -> tuple[str, ...]:
        return tuple(self.shapes(1, 1, 1))

    @property
    def biases(self) -> tuple[str, ...]:
        """The stored expert bias names."""
        return tuple(b for b in (self.gate_up_bias, self.down_bias) if b is not None)

    @property
    def marker(self) -> str:
        return self.gate_up


@dataclass(frozen=True)
class Stacked:
    """Routed experts stacked per projection: gate, up [E, F, H], down [E, H, F] (Step-3.5's
    moe.gate_proj / up_proj / down_proj)."""

    gate: str
    up: str
    down: str
    description = "stacked tensors (gate, up [E, F, H], down [E, H, F])"

    def shapes(self, count: int, ffn: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return {self.gate: (count, ffn, hidden), self.up: (count, ffn, hidden),
                self.down: (count, hidden, ffn)}

    def prefixes(self) -> tuple[str, ...]:
        return (self.gate, self.up, self.down)

    @property
    def biases(self) -> tuple[str, ...]:
        return ()

    @property
    def marker(self) -> str:
        return self.gate


ExpertLayout = PerExpert | Fused | Stacked


def group_limited(method_key: str | None = None, method: str = "", min_per_group: int = 1,
                   count_key: str = "n_group"):
    """Routing groups read from n_group / topk_group (DeepSeek): a token picks its experts
    within its best topk_group groups, each group ranked by its top `min_per_group` scores.
    method_key: a config key that must equal `method` for the groups to apply (DeepSeek-V2's
    topk_method); count_key: the key of the group count (Kimi-Linear's num_expert_group)."""
    def groups(config: dict) -> RoutingGroups | None:
        if method_key is not None and config.get(method_key, "greedy") != method:
            return None
        n_group, topk_group = config.get(count_key) or 1, config.get("topk_group") or 1
        return RoutingGroups(n_group, topk_group, min_per_group) if n_group > 1 else None
    return groups


@dataclass(frozen=True)
class RoutingGroups:
    """Group-limited routing: experts form `count` contiguous groups; a token picks from its
    best `picked` groups, each group ranked by its best `ranked_by` scores."""

    count: int
    picked: int
    ranked_by: int


def no_groups(config: dict) -> RoutingGroups | None:
    return None


@dataclass(frozen=True)
class MtpLayout:
    """Where a family stores its multi-token-prediction (MTP) layer and the tensors that feed
    its decoder layer x = projection(cat(embedding_norm(embed(t_{i+1})), hidden_norm(h_i)))
    (mtp.py). Tensor names are below own_prefix; every supported family's engines put the
    embedding first and take h_i after the final norm, so neither is a field."""

    count_key: str  # the config key of how many MTP layers there are
    default_count: int = 0  # without count_key: the count vLLM assumes
    # Where MTP layer d's decoder layer is ({depth} stands for d): None after the decoder
    # layers, at index num_hidden_layers + d (DeepSeek-V3, GLM).
    layer_prefix: str | None = None
    own_prefix: str | None = None  # where its own tensors are: None beside its decoder layer
    embedding_norm: str = "enorm.weight"
    hidden_norm: str = "hnorm.weight"
    projection: str = "eh_proj.weight"  # [H, 2H]
    output_norm: str = "shared_head.norm.weight"  # before the LM head; not calibrated
    # Copies of the embedding and the LM head some checkpoints add (DeepSeek-V3's layer 61).
    optional: tuple[str, ...] = ("shared_head.head.weight", "embed_tokens.weight")

    @property
    def required(self) -> tuple[str, ...]:
        return (self.embedding_norm, self.hidden_norm, self.projection, self.output_norm)

    def shapes(self, hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of its own tensors, by name: the projection [H, 2H], the
        embedding and head copies [V, H], the norms [H]."""
        return {name: (hidden, 2 * hidden) if name == self.projection
                else (vocab, hidden) if name in self.optional else (hidden,)
                for name in self.required + self.optional}


# DeepSeek-V3's and GLM's: model.layers.{num_hidden_layers}, its own tensors beside.
NEXTN = MtpLayout("num_nextn_predict_layers")


def qwen_mtp(count_key: str) -> MtpLayout:
    """Qwen3-Next's and Qwen3.5's, outside the text model: mtp.fc, mtp.pre_fc_norm_embedding,
    mtp.pre_fc_norm_hidden and mtp.norm beside the decoder layer mtp.layers.0 (vLLM's
    qwen3_next_mtp.py, qwen3_5_mtp.py; one layer unless config.json says otherwise)."""
    return MtpLayout(count_key, default_count=1, layer_prefix="mtp.layers.{depth}.",
                     own_prefix="mtp.", embedding_norm="pre_fc_norm_embedding.weight",
                     hidden_norm="pre_fc_norm_hidden.weight", projection="fc.weight",
                     output_norm="norm.weight", optional=())
