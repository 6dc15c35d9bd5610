from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.selection.allocation import allocate_budget, gumbel_keys, top_m_by_group


def reference_allocation(budget, weights, capacities):
    """Exact water-filling with Fractions, then largest remainder (ties to the lower index)."""
    weights = [Fraction(w) for w in weights]
    allocation = [0] * len(weights)
    open_ = [c > 0 for c in capacities]
    remaining = budget
    while remaining:
        total = sum(w for w, o in zip(weights, open_, strict=True) if o)
        share = [remaining * w / total if o else Fraction(0) for w, o in zip(weights, open_, strict=True)]
        full = [o and share[j] >= capacities[j] for j, o in enumerate(open_)]
        if not any(full):
            floors = [int(s) for s in share]
            missing = remaining - sum(floors)
            order = sorted(range(len(share)), key=lambda j: (-(share[j] - floors[j]), j))
            for j in order[:missing]:
                floors[j] += 1
            return [a + f for a, f in zip(allocation, floors, strict=True)]
        for j, is_full in enumerate(full):
            if is_full:
                allocation[j] = capacities[j]
                remaining -= capacities[j]
                open_[j] = False
    return allocation


def test_proportional_split_is_exact():
    assert allocate_budget(10, np.array([50, 30, 20]), np.array([50, 30, 20])).tolist() == [5, 3, 2]
    # largest remainder: 7 * (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4 -> 4, 2, 1
    assert allocate_budget(7, np.array([5, 3, 2]), np.array([50, 30, 20])).tolist() == [4, 2, 1]


def test_small_cluster_passes_its_deficit_on():
    # shares of 12 by weight 1:1:1 are 4 each, but cluster 0 holds only 1 row: the other two get 5.5 -> 6, 5
    assert allocate_budget(12, np.array([1.0, 1.0, 1.0]), np.array([1, 100, 100])).tolist() == [1, 6, 5]


def test_ties_go_to_the_lower_index():
    assert allocate_budget(1, np.ones(3), np.full(3, 5)).tolist() == [1, 0, 0]
    assert allocate_budget(2, np.ones(3), np.full(3, 5)).tolist() == [1, 1, 0]


def test_zero_weight_clusters_fill_last():
    assert allocate_budget(4, np.array([1.0, 0.0]), np.array([3, 3])).tolist() == [3, 1]


def test_errors():
    with pytest.raises(InputError, match="larger than the rows available"):
        allocate_budget(10, np.ones(2), np.array([3, 3]))
    with pytest.raises(InputError, match="non-negative"):
        allocate_budget(1, np.array([-1.0, 1.0]), np.array([3, 3]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 20), st.integers(0, 30)), min_size=1, max_size=12),
    st.data(),
)
def test_matches_exact_reference(clusters, data):
    weights = [w for w, _ in clusters]
    capacities = [c for _, c in clusters]
    budget = data.draw(st.integers(0, sum(capacities)))
    got = allocate_budget(budget, np.array(weights, dtype=float), np.array(capacities))
    assert got.tolist() == reference_allocation(budget, weights, capacities)
    assert got.sum() == budget
    assert (got <= np.array(capacities)).all()


def test_top_m_by_group_matches_naive():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 5, size=200)
    keys = rng.normal(size=200).round(1)  # rounding creates ties
    quota = np.array([3, 0, 7, 50, 1])
    quota = np.minimum(quota, np.bincount(groups, minlength=5))
    got = top_m_by_group(keys, groups, quota)
    expected = []
    for g in range(5):
        members = [i for i in range(200) if groups[i] == g]
        members.sort(key=lambda i: (-keys[i], i))
        expected += members[: quota[g]]
    assert got.tolist() == sorted(expected)


def test_gumbel_top_k_samples_proportionally():
    """Top-1 of Gumbel keys + log-weights is a draw with probability ∝ weights."""
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(1)
    draws = [int(np.argmax(gumbel_keys(rng, 4, np.log(weights)))) for _ in range(20_000)]
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, weights / weights.sum(), atol=0.015)
