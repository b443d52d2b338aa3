import itertools

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from hcconvert.methods.clustering import GROUPINGS, LINKAGES, _agglomerate, group_experts

ALL_METHODS = [("hierarchical", link) for link in LINKAGES] + [
    (grouping, "average") for grouping in GROUPINGS if grouping != "hierarchical"
]


def as_partition(groups):
    return {frozenset(g) for g in groups}


def check_partition(groups, num_experts, num_groups, max_size=None):
    assert len(groups) == num_groups
    assert all(groups), "empty group"
    assert sorted(e for g in groups for e in g) == list(range(num_experts))
    assert all(g == sorted(g) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    if max_size is not None:
        assert max(len(g) for g in groups) <= max_size


def planted(seed=0):
    """8 experts in 4 tight clusters around distant centres; expert e is in cluster e % 4."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=100.0, size=(4, 16))
    features = centres[np.arange(8) % 4] + rng.normal(scale=0.01, size=(8, 16))
    return features, [[0, 4], [1, 5], [2, 6], [3, 7]]


def random_features(num_experts=12, dim=5, seed=0):
    return np.random.default_rng(seed).normal(size=(num_experts, dim))


@pytest.mark.parametrize("grouping,link", ALL_METHODS)
@pytest.mark.parametrize("max_size", [None, 4])
def test_exact_count_on_random_features(grouping, link, max_size):
    x = random_features()
    freq = np.arange(12)
    for r in range(1, 13):
        if max_size is not None and r * max_size < 12:
            continue
        groups = group_experts(x, freq, r, grouping=grouping, linkage=link,
                               max_group_size=max_size)
        check_partition(groups, 12, r, max_size)


@pytest.mark.parametrize("grouping,link", ALL_METHODS)
@pytest.mark.parametrize("max_size", [None, 4])
def test_exact_count_with_identical_experts(grouping, link, max_size):
    identical = np.ones((8, 3))
    pairs = np.repeat(random_features(4, 3), 2, axis=0)  # 4 pairs of duplicates
    for x in (identical, pairs):
        for r in range(1, 9):
            if max_size is not None and r * max_size < 8:
                continue
            groups = group_experts(x, np.zeros(8), r, grouping=grouping, linkage=link,
                                   max_group_size=max_size)
            check_partition(groups, 8, r, max_size)


def test_fcluster_undercounts_on_ties():
    # Why the tree is cut by replaying merges: maxclust skips straight past tied heights.
    x = np.repeat(random_features(4, 3), 2, axis=0)
    labels = fcluster(linkage(x, "average"), 6, criterion="maxclust")
    assert labels.max() < 6
    check_partition(group_experts(x, np.zeros(8), 6), 8, 6)


@pytest.mark.parametrize("link", LINKAGES)
def test_matches_scipy_fcluster_without_ties(link):
    x = random_features(num_experts=16, seed=3)
    z = linkage(x, link)
    for r in range(1, 17):
        labels = fcluster(z, r, criterion="maxclust")
        expected = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
        groups = group_experts(x, np.zeros(16), r, linkage=link)
        assert as_partition(groups) == as_partition(expected)


@pytest.mark.parametrize("link", LINKAGES)
@pytest.mark.parametrize("seed", range(3))
def test_own_agglomeration_matches_scipy(link, seed):
    x = random_features(num_experts=20, dim=6, seed=seed)
    for r in range(1, 21):
        ours = _agglomerate(x, r, link)
        reference = group_experts(x, np.zeros(20), r, linkage=link)
        assert as_partition(ours) == as_partition(reference)


@pytest.mark.parametrize("link", LINKAGES)
@pytest.mark.parametrize("max_size", [None, 2, 3])
def test_hierarchical_recovers_planted_groups(link, max_size):
    x, expected = planted()
    groups = group_experts(x, np.zeros(8), 4, linkage=link, max_group_size=max_size)
    assert groups == expected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_size", [None, 2])
def test_kmeans_recovers_planted_groups(seed, max_size):
    x, expected = planted(seed)
    groups = group_experts(x, np.zeros(8), 4, grouping="kmeans", seed=seed,
                           max_group_size=max_size)
    assert groups == expected


@pytest.mark.parametrize("max_size", [None, 2])
def test_dominant_recovers_planted_groups_with_one_leader_per_cluster(max_size):
    x, expected = planted()
    freq = np.array([5, 9, 7, 8, 1, 2, 0, 3])  # experts 0-3 lead, one per cluster
    groups = group_experts(x, freq, 4, grouping="dominant", max_group_size=max_size)
    assert groups == expected


def test_dominant_leaders_are_most_frequent_with_ties_to_lower_index():
    x = np.arange(6, dtype=float)[:, None]
    freq = np.array([1, 5, 5, 0, 0, 0])  # leaders: 1 and 2 (tie), not 0
    assert group_experts(x, freq, 2, grouping="dominant") == [[0, 1], [2, 3, 4, 5]]
    # All zero counts: the lowest indices lead.
    assert group_experts(x, np.zeros(6), 2, grouping="dominant") == [[0], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_deterministic_for_same_seed(grouping):
    x = random_features(num_experts=16)
    runs = [group_experts(x, np.arange(16), 5, grouping=grouping, seed=7) for _ in range(2)]
    assert runs[0] == runs[1]


def test_random_grouping_depends_on_seed():
    x = random_features(num_experts=16)
    runs = {str(group_experts(x, np.zeros(16), 5, grouping="random", seed=s)) for s in range(5)}
    assert len(runs) > 1


@pytest.mark.parametrize("grouping,link", ALL_METHODS)
def test_cap_binds_on_lopsided_data(grouping, link):
    # One big blob and a few outliers: uncapped clustering lumps the blob together.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(scale=0.1, size=(12, 4)), 50 + rng.normal(size=(4, 4))])
    freq = np.arange(16)[::-1]
    if grouping != "random":
        uncapped = group_experts(x, freq, 4, grouping=grouping, linkage=link)
        assert max(len(g) for g in uncapped) > 4
    groups = group_experts(x, freq, 4, grouping=grouping, linkage=link, max_group_size=4)
    check_partition(groups, 16, 4, max_size=4)
    assert all(len(g) == 4 for g in groups)


def test_capped_agglomeration_finishes_when_greedy_merging_gets_stuck():
    # Three tight pairs: greedy capped merging ends at three pairs, but two groups of at
    # most three are wanted, so one pair is split between the others.
    x, _ = planted()
    x = x[[0, 4, 1, 5, 2, 6]]
    for link in LINKAGES:
        groups = group_experts(x, np.zeros(6), 2, linkage=link, max_group_size=3)
        check_partition(groups, 6, 2, max_size=3)
        # The pairs {0, 1} and {2, 3} stay whole; the last pair is the one split up.
        assert {0, 1} <= set(groups[0]) and {2, 3} <= set(groups[1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"grouping": "spectral"}, "hierarchical"),
        ({"linkage": "centroid"}, "ward"),
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 9}, "num_groups"),
        ({"features": np.zeros(8)}, "features"),
        ({"features": np.zeros((7, 2))}, "frequencies"),
        ({"frequencies": np.zeros(7)}, "frequencies"),
        ({"features": np.full((8, 2), np.nan)}, "NaN"),
        ({"max_group_size": 0}, "max_group_size"),
        ({"max_group_size": 2, "num_groups": 3}, "cannot hold"),
    ],
)
def test_validation_errors(kwargs, message):
    args = {"features": np.zeros((8, 2)), "frequencies": np.zeros(8), "num_groups": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        group_experts(**args)


def test_extremes():
    x = random_features(num_experts=5)
    for grouping, link in itertools.product(GROUPINGS, LINKAGES):
        assert group_experts(x, np.zeros(5), 1, grouping=grouping, linkage=link) == [
            [0, 1, 2, 3, 4]
        ]
        assert group_experts(x, np.zeros(5), 5, grouping=grouping, linkage=link) == [
            [e] for e in range(5)
        ]
    assert group_experts(np.zeros((1, 3)), np.zeros(1), 1) == [[0]]
