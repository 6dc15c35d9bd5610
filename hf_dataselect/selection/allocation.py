"""Splitting a budget across clusters, and sampling inside a cluster (ALGORITHMS.md §5, shared with §6).

Both are exact and deterministic: the split is largest-remainder rounding of a proportional share, with the
deficit of clusters smaller than their share handed to the others in proportion; the in-cluster draw is the
Gumbel-top-k form of sequential sampling without replacement with probability ∝ ``exp(q / T)``.
"""

from __future__ import annotations

import numpy as np

from hf_dataselect.errors import InputError


def allocate_budget(budget: int, weights: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Integer slots per cluster: proportional to ``weights``, never above ``capacities``, summing to ``budget``.

    First the real-valued shares are water-filled: every cluster whose share reaches its capacity is filled
    completely and the rest of the budget is shared again among the others, in proportion to their weights,
    until no share exceeds its capacity. Then the open clusters' shares are rounded by largest remainder (ties
    to the lower cluster index); a share below its capacity never rounds above it.
    """
    weights = np.asarray(weights, dtype=np.float64)
    capacities = np.asarray(capacities, dtype=np.int64)
    if weights.shape != capacities.shape or weights.ndim != 1:
        raise ValueError("weights and capacities must be 1-D arrays of the same length")
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise InputError("Cluster weights must be finite and non-negative.")
    if budget < 0:
        raise InputError(f"budget must be non-negative, got {budget}.")
    if budget > capacities.sum():
        raise InputError(f"budget {budget} is larger than the rows available ({int(capacities.sum())}).")

    allocation = np.zeros_like(capacities)
    open_clusters = capacities > 0
    # clusters without weight only take rows once every weighted cluster is full
    if weights[open_clusters].sum() <= 0 or capacities[open_clusters & (weights > 0)].sum() < budget:
        allocation[open_clusters & (weights > 0)] = capacities[open_clusters & (weights > 0)]
        open_clusters &= weights <= 0
        weights = np.where(open_clusters, capacities, 0).astype(np.float64)
    remaining = budget - int(allocation.sum())
    while remaining > 0:
        share = np.zeros_like(weights)
        share[open_clusters] = remaining * weights[open_clusters] / weights[open_clusters].sum()
        full = open_clusters & (share >= capacities)
        if not full.any():
            return allocation + _largest_remainder(share, remaining)
        allocation[full] = capacities[full]
        remaining -= int(capacities[full].sum())
        open_clusters &= ~full
    return allocation


def _largest_remainder(ideal: np.ndarray, total: int) -> np.ndarray:
    # rounded so that shares equal in exact arithmetic (3.0 vs 2.9999999999) are equal in floating point too
    ideal = np.round(ideal, 9)
    floors = np.floor(ideal).astype(np.int64)
    missing = total - int(floors.sum())
    if missing > 0:
        remainders = np.round(ideal - floors, 9)
        # descending remainder, ascending index for ties
        order = np.lexsort((np.arange(len(ideal)), -remainders))
        floors[order[:missing]] += 1
    return floors


def gumbel_keys(rng: np.random.Generator, size: int, log_weights: np.ndarray | None = None) -> np.ndarray:
    """Sort keys whose top-m are a sample without replacement with probability ∝ ``exp(log_weights)``."""
    keys = rng.gumbel(size=size)
    if log_weights is not None:
        keys = keys + log_weights
    return keys


def top_m_by_group(keys: np.ndarray, groups: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Positions of the ``quota[g]`` largest keys of every group ``g`` (ties to the lower position).

    One global sort, so it is linear-log in the pool size whatever the number of groups.
    """
    positions = np.arange(len(keys))
    order = np.lexsort((positions, -keys, groups))  # by group, then key descending, then position
    sorted_groups = groups[order]
    group_starts = np.searchsorted(sorted_groups, np.arange(len(quota)))
    rank_in_group = np.arange(len(order)) - group_starts[sorted_groups]
    chosen = order[rank_in_group < quota[sorted_groups]]
    return np.sort(chosen)
