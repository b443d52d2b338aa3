"""`--method ream` is REAM as its official code runs it: groups and merged weights equal a
reimplementation of the official steps (ream_reference.py) on a tiny model; the published
group shapes (pseudo-pruning); the randomized PCA equals torch's; hcconvert's earlier variant
stays as `ream-balanced`."""

import json

import numpy as np
import pytest
import torch
from checkpoints import save_tiny_mixtral
from cli_runs import assert_user_error, convert_args, run
from ream_reference import ream_reference

from hcconvert.methods.pca import lowrank_pca
from hcconvert.methods.ream import cosine_distance, floored, pseudo_groups
from hcconvert.model.spec import open_source
from hcconvert.pipeline.calibration import load_calibration
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions

# 3H = 48 <= 64 principal components: the PCA keeps every direction, so the weight
# distances do not hang on which near-equal singular values fall at the cut.
TINY_REAM = dict(hidden_size=16, intermediate_size=32, num_local_experts=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_mixtral(tmp_path_factory.mktemp("ream") / "src", **TINY_REAM)


@pytest.mark.parametrize("experts,group_size", [
    (4, None),  # the published C = 16: one group of five, three leaders alone
    (3, 3),  # groups of three: two full groups, the third leader alone
    (5, 2),  # pairs: three leaders take one member each
])
def test_groups_and_merged_weights_equal_the_official_code(tmp_path, tiny, calib_text,
                                                           experts, group_size):
    from transformers import AutoModelForCausalLM

    options = ConvertOptions(experts=experts, method="ream", max_group_size=group_size,
                             calib=str(calib_text), calib_samples=4, seq_len=32)
    convert(str(tiny), tmp_path / "out", options, progress=False)
    written = json.loads((tmp_path / "out" / "hcconvert.json").read_text())["layers"]
    tokens = load_calibration(open_source(str(tiny))[0], str(calib_text), 4, 32, 42)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    groups = ream_reference(reference, tokens, experts, group_size or 16)
    assert [layer["groups"] for layer in written] == groups
    assert any(len(group) > 1 for layer in groups for group in layer)  # something merged
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def groups_of(experts, keep, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    saliency = torch.rand(experts, generator=generator)
    distance = torch.rand(experts, experts, generator=generator).numpy()
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0)
    return saliency, pseudo_groups(saliency, distance, keep, size)


@pytest.mark.parametrize("experts,keep,size,sizes", [
    (8, 4, 16, [5, 1, 1, 1]),  # the 8 -> 4: one group of 5, three leaders untouched
    (128, 96, 16, [16, 16, 3] + [1] * 93),  # 25 %: most leaders stay alone
    (8, 4, 2, [2, 2, 2, 2]),  # ream-balanced's ceil(E / R): every group a pair
])
def test_leaders_fill_groups_in_saliency_order_until_every_expert_is_taken(experts, keep, size,
                                                                           sizes):
    saliency, groups = groups_of(experts, keep, size)
    by_saliency = sorted(groups, key=lambda group: -float(saliency[group[0]]))
    assert [len(group) for group in by_saliency] == sizes
    assert sorted(e for group in groups for e in group) == list(range(experts))
    leaders = [group[0] for group in groups]
    assert leaders == sorted(leaders)  # the merged experts keep their leaders' order
    assert set(leaders) == set(torch.argsort(saliency, descending=True)[:keep].tolist())


def test_a_never_picked_expert_gets_the_least_saliency_not_zero():
    assert floored(torch.tensor([0.0, 2.0, 0.7, 0.0])).tolist() == pytest.approx(
        [0.5, 2.0, 0.7, 0.5])
    assert floored(torch.tensor([0.0, 0.3])).tolist() == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("rows,columns,q", [
    (300, 96, 64),  # tall, as every real layer's [E·F, 3H]
    (60, 96, 40),  # wide: torch transposes it
])
def test_blockwise_pca_gives_the_distances_of_torch_pca_lowrank(rows, columns, q):
    matrix = torch.randn(rows, columns, generator=torch.Generator().manual_seed(1))
    centred = matrix - matrix.mean(0)
    torch.manual_seed(0)
    _, values, vectors = torch.pca_lowrank(centred, q=q)
    expected = centred @ (vectors * values)
    mean, values, vectors = lowrank_pca(lambda: iter(matrix.split(37)), q)
    found = (matrix - mean) @ (vectors * values)
    torch.testing.assert_close(distances(found), distances(expected), atol=1e-3, rtol=1e-3)


def distances(rows):
    """Pairwise distances, computed directly (cdist's matrix-product shortcut rounds)."""
    return torch.cdist(rows.double(), rows.double(), compute_mode="donot_use_mm_for_euclid_dist")


def test_balanced_leaders_are_the_most_salient_and_members_join_the_most_similar():
    saliency = torch.tensor([5.0, 1.0, 4.0, 0.5])
    # Expert 1 resembles expert 2 and expert 3 resembles expert 0, in outputs and logits.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]])
    distance = cosine_distance(features, features)
    assert pseudo_groups(saliency, distance, 2, 2) == [[0, 3], [2, 1]]


def test_ream_balanced_is_the_earlier_variant(tmp_path, tiny, calib_text):
    options = ConvertOptions(experts=4, method="ream-balanced", calib=str(calib_text),
                             calib_samples=4, seq_len=32)
    conversion = convert(str(tiny), tmp_path / "out", options, progress=False)
    for layer in conversion.layers:
        assert [len(group) for group in layer.groups] == [2, 2, 2, 2]
    assert ("leaders by REAP's saliency from the model's routing, groups of up to ceil(E/R) "
            "filled by cosine similarity, msmoe merge, freq-avg router") in options.describe()


@pytest.mark.parametrize("args,fragment", [
    (["--method", "hc-smoe", "--merge", "ream"], "--merge ream works on REAM's leaders"),
    (["--method", "msmoe", "--router", "leader"], "--router leader works on REAM's leaders"),
    (["--method", "ream", "--max-group-size", "2"], "3 groups of at most 2 cannot hold 8"),
])
def test_settings_that_need_ream_groups_are_refused(tmp_path, tiny, calib_text, args,
                                                    fragment):
    result = run(*convert_args(tiny, tmp_path / "out", calib_text, *args), "--dry-run")
    assert_user_error(result, fragment)
