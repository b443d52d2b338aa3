"""Grouping metrics, merge rules and pruning criteria: planted groups are found, neuron
alignment and the least-squares merge are exact where they must be, O-prune keeps the largest
routed contribution, and every named method writes a checkpoint transformers loads."""

import json

import pytest
import torch
from checkpoints import EXPERT, ROUTER, load_all, save_tiny_mixtral
from cli_runs import assert_user_error, convert_args, run
from expert_sets import GPT_OSS_ACTIVATION, biased_permuted_copies, random_experts
from scipy.spatial.distance import pdist

from hcconvert.cli.demo import DemoShape, build_planted_mixtral, data_file
from hcconvert.eval.compare import named_variants, shared_passes
from hcconvert.methods.alignment import NeuronMatcher, aligned
from hcconvert.methods.features import router_logit_features, weight_features
from hcconvert.methods.merging import member_weights, merge_experts
from hcconvert.methods.pruning import prune_groups
from hcconvert.methods.statistics import collect_layer_stats, output_means
from hcconvert.model.experts import Experts, RoutedExperts, RoutingRecord
from hcconvert.pipeline.convert import convert, convert_many
from hcconvert.pipeline.options import ConvertOptions
from hcconvert.pipeline.recipes import RECIPES

SHAPE = DemoShape(layers=2, hidden=64, ffn=64, experts=8, heads=4, kv_heads=2)
# Every method whose grouping compares experts by a similarity (not dominant, not random).
SIMILARITY_METHODS = ["hc-smoe", "hc-smoe-single", "hc-smoe-complete", "hc-smoe-ward",
                      "router-logits", "weights", "kmeans", "average", "fix-dom", "mergemoe"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Every named method converted in one shared pass over a planted Mixtral."""
    root = tmp_path_factory.mktemp("planted")
    groups = build_planted_mixtral(root / "src", SHAPE)
    base = ConvertOptions(method="hc-smoe",
                          experts=4, calib=str(data_file("demo_calib.txt")), calib_samples=4,
                          seq_len=128)
    variants = named_variants(list(RECIPES), base)
    conversions = {}
    for labels in shared_passes(variants):  # REAM propagates merged outputs: a pass of its own
        done = convert_many(str(root / "src"), [(root / name, variants[name]) for name in labels],
                            progress=False)
        conversions.update(zip(labels, done, strict=True))
    return root, groups, conversions


@pytest.mark.parametrize("method", SIMILARITY_METHODS)
def test_planted_pairs_are_grouped(planted, method):
    _, groups, conversions = planted
    assert [layer.groups for layer in conversions[method].layers] == groups


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_method_loads_in_transformers(planted, method):
    from transformers import AutoModelForCausalLM

    root, _, _ = planted
    model = AutoModelForCausalLM.from_pretrained(root / method, dtype=torch.float32)
    assert model.config.num_local_experts == 4
    with torch.no_grad():
        logits = model(torch.randint(3, 200, (2, 16))).logits
    assert torch.isfinite(logits).all()
    assert json.loads((root / method / "hcconvert.json").read_text())["options"]["experts"] == 4


@pytest.mark.parametrize("method", ["f-prune", "o-prune"])
def test_pruning_keeps_survivors_and_their_router_rows(planted, method):
    root, _, conversions = planted
    source, written = load_all(root / "src"), load_all(root / method)
    for layer in conversions[method].layers:
        kept = [group[0] for group in layer.groups]
        assert all(len(group) == 1 for group in layer.groups)
        router = ROUTER.format(layer=layer.layer)
        assert torch.equal(written[router], source[router][kept])
        for new, old in enumerate(kept):
            for w in ("w1", "w2", "w3"):
                assert torch.equal(written[EXPERT.format(layer=layer.layer, e=new, w=w)],
                                   source[EXPERT.format(layer=layer.layer, e=old, w=w)])


def with_permuted_copies(base: Experts, perms: list[torch.Tensor]) -> Experts:
    """Expert 0 of base, then one copy of it per permutation (rows of gate/up, down columns)."""
    gate, up, down = base.gate[0], base.up[0], base.down[0]
    return Experts(torch.stack([gate] + [gate[p] for p in perms]),
                   torch.stack([up] + [up[p] for p in perms]),
                   torch.stack([down] + [down[:, p] for p in perms]))


def matcher_for(experts: Experts, tokens=512, seed=1) -> NeuronMatcher:
    """Every token routed to every expert."""
    x = torch.randn(tokens, experts.gate.shape[2], generator=torch.Generator().manual_seed(seed))
    selected = torch.arange(len(experts)).repeat(tokens, 1)
    return NeuronMatcher(x, selected, experts)


def test_alignment_recovers_a_neuron_permutation():
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    experts = with_permuted_copies(random_experts(), [perm])
    matcher = matcher_for(experts)
    assert torch.equal(experts.gate[1][matcher.permutation([0, 1], 0, 1)], experts.gate[0])
    member = aligned(experts.expert(1), matcher.permutation([0, 1], 0, 1))
    for name in ("gate", "up", "down"):
        assert torch.equal(member[name], getattr(experts, name)[0])


def test_fix_dom_keeps_the_dominant_expert_of_permuted_copies():
    gen = torch.Generator().manual_seed(4)
    experts = with_permuted_copies(random_experts(), [torch.randperm(16, generator=gen),
                                                      torch.randperm(16, generator=gen)])
    counts = torch.tensor([2.0, 5.0, 3.0])  # expert 1, a permuted copy, is the dominant
    merged = merge_experts(experts, [[0, 1, 2]], counts, "fix-dom", matcher_for(experts))
    for name in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(merged, name)[0], getattr(experts, name)[1])


def swiglu(x, gate, up, down):
    """One expert written out independently of hcconvert: down(silu(gate x) · up x)."""
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T


def group_output(experts: Experts, x: torch.Tensor, group, counts) -> torch.Tensor:
    """The frequency-weighted sum of the members' outputs: what a merged expert should give."""
    weights = member_weights(group, counts, "freq").float()
    return sum(w * swiglu(x, experts.gate[e], experts.up[e], experts.down[e])
               for e, w in zip(group, weights, strict=True))


def test_mergemoe_reproduces_permuted_copies_exactly():
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    experts = with_permuted_copies(random_experts(), [perm])
    counts = torch.tensor([3.0, 7.0])
    matcher = matcher_for(experts)
    merged = merge_experts(experts, [[0, 1]], counts, "mergemoe", matcher)
    x = matcher.x
    torch.testing.assert_close(swiglu(x, merged.gate[0], merged.up[0], merged.down[0]),
                               group_output(experts, x, [0, 1], counts), rtol=1e-4, atol=1e-4)


def test_mergemoe_fits_the_members_output_better_than_averaging():
    experts, counts = random_experts(), torch.tensor([4.0, 3.0, 1.0])
    matcher = matcher_for(experts)
    x, target = matcher.x, group_output(experts, matcher.x, [0, 1, 2], counts)

    def error(merge):
        merged = merge_experts(experts, [[0, 1, 2]], counts, merge, matcher)
        return (swiglu(x, merged.gate[0], merged.up[0], merged.down[0]) - target).norm()

    assert error("mergemoe") < min(error("msmoe"), error("freq"))


def test_activation_merges_need_a_matcher():
    with pytest.raises(ValueError, match="activations"):
        merge_experts(random_experts(), [[0, 1], [2]], torch.ones(3), "msmoe")


def test_o_prune_keeps_the_largest_routed_contribution():
    gen = torch.Generator().manual_seed(6)
    experts = random_experts(count=4)
    x, router = torch.randn(600, 8, generator=gen), torch.randn(4, 8, generator=gen)
    probs = torch.softmax(x @ router.T, -1)
    weights, index = probs.topk(1, dim=-1)  # top-1 softmax routing, not renormalised
    counts = collect_layer_stats(x, index, router, experts, frozenset()).counts
    busy, quiet = int(counts.argmax()), int(counts.argmin())
    assert counts[quiet] > 0
    experts.down[busy] *= 1e-3  # picked most, contributes least
    experts.down[quiet] *= 100
    record = RoutingRecord(x.shape[0], saliency=True)
    RoutedExperts(experts, record)(x, index, weights)  # the forward records the saliency
    stats = collect_layer_stats(x, index, router, experts, frozenset({"saliency"}), 42, record)
    for e in range(4):  # REAP: mean over routed tokens of router weight x output norm
        mine = stats.selected[:, 0] == e
        out = swiglu(x[mine], experts.gate[e], experts.up[e], experts.down[e])
        expected = (probs[mine, e] * out.norm(dim=-1)).mean()
        torch.testing.assert_close(stats.saliency[e], expected, rtol=1e-5, atol=1e-7)
    assert prune_groups(stats.saliency, 1) == [[quiet]]
    assert prune_groups(stats.counts, 1) == [[busy]]


def test_weight_features_keep_pairwise_distances():
    experts = random_experts(count=5, seed=7)
    flat = torch.cat([experts.gate.flatten(1), experts.up.flatten(1),
                      experts.down.transpose(1, 2).flatten(1)], dim=1).double()
    features = weight_features(experts)
    assert features.shape == (5, 5)
    torch.testing.assert_close(torch.from_numpy(pdist(features.numpy())),
                               torch.from_numpy(pdist(flat.numpy())), rtol=1e-9, atol=1e-9)


def test_router_logit_features_use_a_seeded_sample():
    gen = torch.Generator().manual_seed(8)
    x, router = torch.randn(9000, 4, generator=gen), torch.randn(3, 4, generator=gen)
    first = router_logit_features(x, router, seed=1)
    assert first.shape == (3, 8192)
    assert torch.equal(first, router_logit_features(x, router, seed=1))
    assert not torch.equal(first, router_logit_features(x, router, seed=2))
    assert router_logit_features(x[:100], router, seed=1).shape == (3, 100)


def test_max_group_size_is_respected(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(method="hc-smoe",
                             experts=3, calib=str(calib_text), calib_samples=2, seq_len=32,
                             max_group_size=2, grouping="kmeans", merge="msmoe")
    conversion = convert(str(src), tmp_path / "out", options, progress=False)
    assert all(len(g) == 2 for layer in conversion.layers for g in layer.groups)


@pytest.mark.parametrize("extra,fragment", [
    (("--merge", "median"), "'--merge'"),
    (("--metric", "cosine"), "'--metric'"),
    (("--grouping", "spectral"), "'--grouping'"),
    (("--method", "distill"), "'--method'"),
    (("--prune-by", "weight"), "'--prune-by'"),
    (("--max-group-size", 0), "--max-group-size 0 is not valid"),
    (("--method", "hc-smoe", "--max-group-size", 1), "cannot hold 6 experts"),
])
def test_bad_method_options_fail_in_one_line(tmp_path, calib_text, extra, fragment):
    src = save_tiny_mixtral(tmp_path / "src")
    assert_user_error(run(*convert_args(src, tmp_path / "out", calib_text, *extra)), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merge", ["msmoe", "fix-dom", "mergemoe"])
def test_aligned_merges_of_biased_permuted_copies_are_exact(merge):
    """Neuron permutations move the gate/up biases with their rows; the merged expert of
    permuted copies computes the original expert, biases and clamped activation included."""
    gen = torch.Generator().manual_seed(8)
    experts = biased_permuted_copies([torch.randperm(16, generator=gen),
                                      torch.randperm(16, generator=gen)])
    matcher = matcher_for(experts)
    merged = merge_experts(experts, [[0, 1, 2]], torch.tensor([2.0, 5.0, 3.0]), merge, matcher)
    assert merged.activation == GPT_OSS_ACTIVATION
    x = matcher.x
    torch.testing.assert_close(merged.output(x, 0), experts.output(x, 0), rtol=1e-4, atol=1e-4)


def test_frequency_merge_averages_biases_with_their_matrices():
    experts = biased_permuted_copies([torch.randperm(16, generator=torch.Generator())])
    counts = torch.tensor([1.0, 3.0])
    merged = merge_experts(experts, [[0, 1]], counts, "freq")
    for name, stacked in experts.parts().items():
        torch.testing.assert_close(getattr(merged, name)[0], 0.25 * stacked[0] + 0.75 * stacked[1])


def test_output_means_of_biased_experts_equal_the_mean_output():
    """The linearity shortcut (mean activations through down, plus its bias) holds for any
    activation: compared with every token's output averaged."""
    gen = torch.Generator().manual_seed(9)
    experts = biased_permuted_copies([torch.randperm(16, generator=gen)])
    x = 2 * torch.randn(300, 8, generator=gen)

    def output(e: int) -> torch.Tensor:  # GPT-OSS's expert, written out
        gate = (x @ experts.gate[e].T + experts.gate_bias[e]).clamp(max=1)
        up = (x @ experts.up[e].T + experts.up_bias[e]).clamp(-1, 1)
        return (gate * torch.sigmoid(1.702 * gate) * (up + 1)) @ experts.down[e].T

    expected = torch.stack([output(e).mean(0) for e in range(2)]) + experts.down_bias
    torch.testing.assert_close(output_means(x, experts), expected, rtol=1e-5, atol=1e-5)
