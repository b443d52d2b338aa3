"""Partition a layer's experts into groups that will each be merged into one expert.

HC-SMoE clusters experts hierarchically on features such as their mean output over
calibration tokens; `dominant`, `kmeans` and `random` are the baselines from the paper.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import cdist, pdist, squareform

GROUPINGS = ("hierarchical", "dominant", "kmeans", "random")
LINKAGES = ("average", "single", "complete", "ward")


_KMEANS_ITERATIONS = 100


def group_experts(
    features: np.ndarray,
    frequencies: np.ndarray,
    num_groups: int,
    *,
    grouping: str = "hierarchical",
    linkage: str = "average",
    max_group_size: int | None = None,
    seed: int = 42,
) -> list[list[int]]:
    """Partition E experts into exactly num_groups non-empty groups.

    features: [E, D], one row per expert; frequencies: [E] router selection counts.
    Each group's members are sorted ascending and groups are ordered by their smallest
    member. The result depends only on the inputs and `seed`.
    """
    x, freq = _validate(features, frequencies, num_groups, grouping, linkage, max_group_size)
    num_experts = len(x)
    if num_groups == num_experts:  # the only partition into E non-empty groups
        return [[e] for e in range(num_experts)]
    if grouping == "hierarchical":
        groups = _hierarchical(x, num_groups, linkage, max_group_size)
    elif grouping == "dominant":
        groups = _labels_to_groups(_dominant(x, freq, num_groups, max_group_size), num_groups)
    elif grouping == "kmeans":
        groups = _labels_to_groups(_kmeans(x, num_groups, max_group_size, seed), num_groups)
    else:
        groups = _labels_to_groups(_random(num_experts, num_groups, max_group_size, seed),
                                   num_groups)
    # Sorting sorted disjoint lists orders them by their first (smallest) member.
    return sorted(sorted(g) for g in groups)


def _validate(features, frequencies, num_groups, grouping, linkage, max_group_size):
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; expected one of {LINKAGES}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty [E, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    num_experts = len(x)
    freq = np.asarray(frequencies, dtype=np.float64)
    if freq.shape != (num_experts,):
        raise ValueError(f"frequencies must have shape ({num_experts},), got {freq.shape}")
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"num_groups must be in [1, {num_experts}], got {num_groups}")
    if max_group_size is not None:
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size}")
        if num_groups * max_group_size < num_experts:
            raise ValueError(f"{num_groups} groups of at most {max_group_size} experts "
                             f"cannot hold {num_experts} experts")
    return x, freq


def _labels_to_groups(labels: np.ndarray, num_groups: int) -> list[list[int]]:
    return [np.flatnonzero(labels == g).tolist() for g in range(num_groups)]


def _assign(dist: np.ndarray, room: np.ndarray | None) -> np.ndarray:
    """Label each row (point) with a column (group): nearest, or nearest with room left."""
    if room is None:
        return np.argmin(dist, axis=1)
    # Greedy over all (point, group) pairs from closest to farthest, so the points that
    # fit a group best claim its places first. Stable sort keeps ties in index order.
    room = room.copy()
    labels = np.full(len(dist), -1)
    for flat in np.argsort(dist, axis=None, kind="stable"):
        point, group = divmod(int(flat), dist.shape[1])
        if labels[point] < 0 and room[group] > 0:
            labels[point] = group
            room[group] -= 1
    return labels


def _hierarchical(x, num_groups, method, max_size):
    if max_size is not None:
        return _agglomerate(x, num_groups, method, max_size)
    # fcluster(criterion="maxclust") may return fewer clusters when merge heights tie,
    # so cut the tree by replaying exactly the first E - R merges instead.
    num_experts = len(x)
    z = scipy_linkage(x, method=method, metric="euclidean")
    members = {e: [e] for e in range(num_experts)}
    for step in range(num_experts - num_groups):
        a, b = int(z[step, 0]), int(z[step, 1])
        members[num_experts + step] = members.pop(a) + members.pop(b)
    return list(members.values())


def _lance_williams(method, d_i, d_j, d_ij, n_i, n_j, n_k):
    """Distances from every cluster k to the union of clusters i and j."""
    if method == "single":
        return np.minimum(d_i, d_j)
    if method == "complete":
        return np.maximum(d_i, d_j)
    if method == "average":
        return (n_i * d_i + n_j * d_j) / (n_i + n_j)
    total = n_i + n_j + n_k  # ward, on Euclidean distances as scipy defines it
    squared = ((n_i + n_k) * d_i**2 + (n_j + n_k) * d_j**2 - n_k * d_ij**2) / total
    # Rounding can push a near-zero distance below zero; a NaN would win every argmin.
    return np.sqrt(np.maximum(squared, 0.0))


def _agglomerate(x, num_groups, method, max_size=None):
    """Agglomerative clustering that never forms a cluster larger than max_size.

    Each step merges the closest pair whose union fits; without a cap this is the same
    tree scipy builds. Cluster slots are indexed by their smallest member.
    """
    num_experts = len(x)
    limit = num_experts if max_size is None else max_size
    dist = squareform(pdist(x))
    np.fill_diagonal(dist, np.inf)
    sizes = np.ones(num_experts)
    members = [[e] for e in range(num_experts)]
    for _ in range(num_experts - num_groups):
        fits = sizes[:, None] + sizes[None, :] <= limit
        candidates = np.where(fits, dist, np.inf)
        flat = int(np.argmin(candidates))
        if not np.isfinite(candidates.flat[flat]):
            break  # every remaining union would exceed the cap
        i, j = divmod(flat, num_experts)  # row-major argmin of a symmetric matrix: i < j
        merged = _lance_williams(method, dist[i], dist[j], dist[i, j], sizes[i], sizes[j], sizes)
        dist[i, :] = dist[:, i] = merged
        dist[j, :] = dist[:, j] = np.inf  # retired slots stay at infinity
        dist[i, i] = np.inf
        sizes[i], sizes[j] = sizes[i] + sizes[j], 0
        members[i] += members[j]
        members[j] = []
    groups = [m for m in members if m]
    if len(groups) > num_groups:
        groups = _dissolve_smallest(x, groups, num_groups, limit)
    return groups


def _dissolve_smallest(x, groups, num_groups, limit):
    """Finish a capped agglomeration stuck with too many clusters.

    Greedy merging can end with e.g. three pairs when two groups of three were wanted.
    Keep the num_groups largest clusters and hand the members of the rest to the nearest
    kept centroid with room; R * N >= E guarantees there is room for all of them.
    """
    ranked = sorted(groups, key=len, reverse=True)  # stable: ties keep slot order
    kept, loose = ranked[:num_groups], [e for g in ranked[num_groups:] for e in g]
    centres = np.stack([x[g].mean(axis=0) for g in kept])
    room = np.array([limit - len(g) for g in kept])
    for expert, label in zip(loose, _assign(cdist(x[loose], centres), room), strict=True):
        kept[label] = kept[label] + [expert]
    return kept


def _dominant(x, freq, num_groups, max_size):
    # Stable sort of negated counts: the most used experts lead, ties go to the lower index.
    leaders = np.argsort(-freq, kind="stable")[:num_groups]
    others = np.setdiff1d(np.arange(len(x)), leaders)
    room = None if max_size is None else np.full(num_groups, max_size - 1)
    labels = np.empty(len(x), dtype=int)
    labels[leaders] = np.arange(num_groups)
    labels[others] = _assign(cdist(x[others], x[leaders]), room)
    return labels


def _kmeans(x, num_groups, max_size, seed):
    rng = np.random.default_rng(seed)
    centres = x[_kmeans_plus_plus(x, num_groups, rng)]
    room = None if max_size is None else np.full(num_groups, max_size)
    labels = None
    for _ in range(_KMEANS_ITERATIONS):
        dist = cdist(x, centres)
        new_labels = _assign(dist, room)
        _fill_empty(new_labels, dist, num_groups)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centres = np.stack([x[labels == g].mean(axis=0) for g in range(num_groups)])
    return labels


def _kmeans_plus_plus(x, num_groups, rng):
    """Distinct seed indices, so identical experts still yield num_groups centres."""
    chosen = [int(rng.integers(len(x)))]
    for _ in range(num_groups - 1):
        weights = cdist(x, x[chosen], "sqeuclidean").min(axis=1)
        weights[chosen] = 0.0
        if weights.sum() <= 0:  # all remaining points coincide with a centre
            weights = np.ones(len(x))
            weights[chosen] = 0.0
        chosen.append(int(rng.choice(len(x), p=weights / weights.sum())))
    return chosen


def _fill_empty(labels, dist, num_groups):
    """Give each empty cluster the worst-fitting point of a cluster that can spare one.

    Moving into an empty cluster never breaks a size cap, and R <= E means some
    cluster has more than one member whenever another is empty.
    """
    for group in range(num_groups):
        if (labels == group).any():
            continue
        counts = np.bincount(labels, minlength=num_groups)
        misfit = np.where(counts[labels] > 1, dist[np.arange(len(labels)), labels], -np.inf)
        labels[int(np.argmax(misfit))] = group


def _random(num_experts, num_groups, max_size, seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_experts)
    labels = np.empty(num_experts, dtype=int)
    labels[order[:num_groups]] = np.arange(num_groups)  # one seed expert per group
    counts = np.ones(num_groups, dtype=int)
    limit = num_experts if max_size is None else max_size
    for expert in order[num_groups:]:
        label = int(rng.choice(np.flatnonzero(counts < limit)))
        labels[expert] = label
        counts[label] += 1
    return labels
