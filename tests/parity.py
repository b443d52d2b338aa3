"""What the family and quantized-storage tests hold hcconvert against: transformers' forward
beside the streamed one, a reduced checkpoint rebuilt from hcconvert.json's groups, the
routers' picks, and byte and relative comparisons of tensors; reduce runs a small conversion."""

import functools
import json
import shutil

import torch
from checkpoints import load_all
from family_models import Case

from hcconvert.eval.streamed import StreamedModel
from hcconvert.model.spec import open_source
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

# Two fixed rows of 24 token ids within the tiny models' vocabulary: the forwards' input.
TOKENS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def our_forward(directory, tokens, dtype, teacher=None):
    """Hidden states after the embeddings and after each layer, and the logits, from the
    streamed forward the pipeline and `eval` run. With teacher (transformers' hidden states),
    each layer starts from the teacher's input: in bf16 a chained forward drifts until some
    token's near-tied top-k flips, which says nothing about either implementation."""
    ckpt, spec = open_source(str(directory))
    model = StreamedModel(ckpt, spec, tokens, torch.device("cpu"), dtype)
    states = [model.stream.hidden.clone()]
    for layer in range(spec.num_layers):
        if teacher is not None:
            model.stream.hidden.copy_(teacher[layer])
        model.advance(layer)
        states.append(model.stream.hidden.clone())
    model.load_head()
    logits = torch.cat([model.layers.decoder.logits(tokens[i:i + 1], model.stream.hidden[i:i + 1])
                        for i in range(tokens.shape[0])])
    return states, logits


def transformers_forward(case: Case, directory, tokens, dtype):
    model = case.load(directory, dtype=dtype)
    with torch.no_grad():
        return model(tokens, output_hidden_states=True)


def assert_same_forward(states, logits, reference, **tolerance):
    """Our hidden states after the embeddings and each layer, and our logits, equal
    transformers' (whose last hidden state has the final norm applied: the logits cover it)."""
    for layer, (ours, theirs) in enumerate(zip(states[:-1], reference.hidden_states[:-1],
                                               strict=True)):
        torch.testing.assert_close(ours, theirs, **tolerance, msg=f"after layer {layer}")
    torch.testing.assert_close(logits, reference.logits.float(), **tolerance)


def member_weights(group, counts):
    freq = counts[group]
    freq = freq if freq.sum() > 0 else torch.ones(len(group), dtype=torch.float64)
    return (freq / freq.sum()).float()


def merge(stacked, group, weights):
    """Σ weights[i] · stacked[group[i]] in fp32, cast back to the source dtype."""
    members = stacked[group].float()
    return (members * weights.view(-1, *[1] * (members.dim() - 1))).sum(0).to(stacked.dtype)


def reference_merge(case: Case, src, out, router_method):
    """The reduced checkpoint rebuilt here from the source and hcconvert.json's groups."""
    record = json.loads((out / "hcconvert.json").read_text())
    tensors = load_all(src)
    count = record["experts_before"]
    for entry in record["layers"]:
        prefix = case.layer_prefix(entry["layer"])
        groups, counts = entry["groups"], torch.tensor(entry["frequencies"], dtype=torch.float64)
        weights = [member_weights(g, counts) for g in groups]
        router = tensors[prefix + case.router]
        if router_method == "dominant":
            rows = [router[max(g, key=lambda e: (counts[e], -e))] for g in groups]
        else:
            rows = [merge(router, g, wg) for g, wg in zip(groups, weights, strict=True)]
        tensors[prefix + case.router] = torch.stack(rows)
        if case.router_bias is not None:  # the dominant member's entry, along its last axis
            bias = tensors[prefix + case.router_bias]
            entries = [bias[..., max(g, key=lambda e: (counts[e], -e))] for g in groups]
            tensors[prefix + case.router_bias] = torch.stack(entries, dim=-1)
        templates, fused = stored_experts(case, tensors, prefix)
        for template in templates:
            if fused:  # one [E, ...] tensor: merge along its first axis
                stacked = tensors[prefix + template]
                tensors[prefix + template] = torch.stack(
                    [merge(stacked, g, wg) for g, wg in zip(groups, weights, strict=True)])
                continue
            stacked = torch.stack([tensors.pop(prefix + template.format(e=e))
                                   for e in range(count)])
            for c, (g, wg) in enumerate(zip(groups, weights, strict=True)):
                tensors[prefix + template.format(e=c)] = merge(stacked, g, wg)
    return tensors


def stored_experts(case: Case, tensors: dict, prefix: str) -> tuple[tuple[str, ...], bool]:
    """The expert tensor names of one layer and whether they are fused: a fused family's
    layer may be stored per expert (a mixed checkpoint)."""
    if case.fused and prefix + case.experts[0] not in tensors:
        return case.saved_per_expert, False
    return case.experts, case.fused


def as_transformers_knows_it(case: Case, directory, copy_to):
    """directory itself, or (a model_type only remote code knows, as Kimi-K2's) a copy at
    copy_to whose config names the transformers model_type with the same architecture."""
    if case.hub_model_type is None:
        return directory
    if copy_to != directory:
        shutil.copytree(directory, copy_to)
    config = json.loads((copy_to / "config.json").read_text())
    (copy_to / "config.json").write_text(json.dumps({**config, "model_type": case.model_type}))
    return copy_to


def keep_index(picks: dict, layer: int, module, args, out) -> None:
    """A forward hook: routers return (logits, top-k weights, top-k index); Llama-4's returns
    (scores, logits) and picks the top-1 logit."""
    picks[layer] = out[2] if len(out) == 3 else out[1].topk(1).indices


def router_picks(model, tokens, layers) -> dict[int, torch.Tensor]:
    """Each of `layers`' top-k expert index [T, K] as the stock model's own routers pick it
    in one forward over tokens (transformers builds no module for an MTP layer)."""
    decoder_layers = text_layers(model)
    picks = {}
    for layer in layers:
        if layer >= len(decoder_layers):
            continue
        block = next(m for m in decoder_layers[layer].modules() if hasattr(m, "experts"))
        router = block.gate if hasattr(block, "gate") else block.router
        router.register_forward_hook(functools.partial(keep_index, picks, layer))
    with torch.no_grad():
        model(tokens)
    return picks


def text_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a model or of a wrapper's text model: the layer list some of
    whose layers hold routed experts."""
    return next(module for module in model.modules() if isinstance(module, torch.nn.ModuleList)
                and any(hasattr(m, "experts") for layer in module for m in layer.modules()))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def relative_error(reference, restored) -> float:
    return ((restored.double() - reference.double()).norm() / reference.double().norm()).item()


def reduce(src, out, experts, calib_text, **options):
    convert(str(src), out, ConvertOptions(experts=experts, calib=str(calib_text),
                                          calib_samples=4, seq_len=64, **options),
            progress=False)
    return json.loads((out / "hcconvert.json").read_text())
