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

    Largest-remainder rounding (ties to the lower cluster index). A cluster whose share exceeds its capacity
    is filled completely and the remaining budget is shared again among the others, in proportion to their
    weights, until everything is placed.
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
    remaining = int(budget)
    while remaining > 0:
        share_weights = np.where(open_clusters, weights, 0.0)
        if share_weights.sum() <= 0:  # only zero-weight clusters have room left: share by room instead
            share_weights = np.where(open_clusters, (capacities - allocation).astype(np.float64), 0.0)
        ideal = remaining * share_weights / share_weights.sum()
        proposal = _largest_remainder(ideal, remaining)
        room = capacities - allocation
        overflow = proposal > room
        if not overflow.any():
            allocation += proposal
            break
        allocation[overflow] += room[overflow]
        remaining -= int(room[overflow].sum())
        open_clusters &= ~overflow
    return allocation


def _largest_remainder(ideal: np.ndarray, total: int) -> np.ndarray:
    floors = np.floor(ideal).astype(np.int64)
    missing = total - int(floors.sum())
    if missing > 0:
        remainders = ideal - floors
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
