"""transformers' own weight converters for a layer's tensors other than its routed experts:
where a checkpoint stores tensors that transformers joins or splits when it loads them
(Kimi-Linear's q/k/v convolutions joined into one, Sarvam-MoE's fused q/k/v split in three),
the layer's module is built from what those converters make of the stored tensors. The
stored tensors themselves are copied as they are; only the routed experts and the router,
which hcconvert reads and writes in the checkpoint's own layout, are left out of this.

transformers applies every renaming to a name, then at most one converter
(core_model_loading.rename_source_key); the same order is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Joined:
    """Stored tensors one converter turns into the module's tensors together."""

    converter: object  # transformers' WeightConverter
    target: str  # the full module name of its first target
    sources: dict[str, list[str]] = field(default_factory=dict)  # pattern -> stored names

    @property
    def names(self) -> list[str]:
        return [name for names in self.sources.values() for name in names]


def layer_converters(transforms: list) -> list:
    """The converters among transformers' weight transforms that build a layer's modules
    from other tensors than the routed experts (whose layouts the family table reads)."""
    from transformers.core_model_loading import WeightConverter

    return [t for t in transforms if isinstance(t, WeightConverter)
            and not any("experts" in pattern for pattern in t.target_patterns)]


def group(renamed: dict[str, str], converters: list) -> tuple[dict[str, str], list[Joined]]:
    """renamed: stored name -> its name after transformers' renamings. Returns the names no
    converter takes (stored name -> module name) and the groups converters take."""
    plain, groups = {}, {}
    for stored, name in renamed.items():
        for converter in converters:
            target, pattern = converter.rename_source_key(name)
            if pattern is not None:
                joined = groups.setdefault((id(converter), target), Joined(converter, target))
                joined.sources.setdefault(pattern, []).append(stored)
                break
        else:
            plain[stored] = name
    return plain, list(groups.values())


@torch.no_grad()
def convert(joined: Joined, tensors: dict[str, torch.Tensor], model, config) -> dict:
    """The module tensors (full module name -> tensor) the converter makes of the stored
    tensors (stored name -> tensor; meta tensors give the shapes alone). model: a skeleton
    with the module's parameters (a split sizes its pieces by them)."""
    converter = joined.converter
    collected = {pattern: [tensors[name] for name in names]
                 for pattern, names in joined.sources.items()}
    for operation in converter.operations:
        collected = operation.convert(collected, source_patterns=converter.source_patterns,
                                      target_patterns=converter.target_patterns,
                                      full_layer_name=joined.target, model=model,
                                      config=config, missing_keys=None)
    # The targets come back as patterns: put each in the first target's place.
    before, _, after = next(joined.target.partition(key) for key in collected
                            if key in joined.target)
    return {before + key + after: tensor for key, tensor in collected.items()}
