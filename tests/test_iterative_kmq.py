"""IterativeKMQ against a naive reference, its rules (ALGORITHMS.md §6), state round trips and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from hf_dataselect.errors import InputError
from hf_dataselect.selection import select
from hf_dataselect.selection.iterative_kmq import IterativeKMQ, allocate_multinomial, reweight


# -- naive reference: loops over clusters and rows, written from the algorithm text -------------------------
def naive_allocate(budget, shares, capacity):
    k = len(shares)
    allocation = [0] * k
    is_open = [capacity[j] > 0 for j in range(k)]
    remaining = budget
    while remaining > 0:
        total = sum(shares[j] for j in range(k) if is_open[j])
        if total <= 0:
            shares = [capacity[j] - allocation[j] for j in range(k)]
            total = sum(shares[j] for j in range(k) if is_open[j])
        ideal = [remaining * shares[j] / total if is_open[j] else 0.0 for j in range(k)]
        proposal = [int(np.floor(x)) for x in ideal]
        leftover = remaining - sum(proposal)
        by_remainder = sorted(range(k), key=lambda j: (-(ideal[j] - proposal[j]), j))
        for j in by_remainder[:leftover]:
            proposal[j] += 1
        overflow = [j for j in range(k) if proposal[j] > capacity[j] - allocation[j]]
        if not overflow:
            for j in range(k):
                allocation[j] += proposal[j]
            break
        for j in overflow:
            remaining -= capacity[j] - allocation[j]
            allocation[j] = capacity[j]
            is_open[j] = False
    return allocation


def naive_rounds(labels, budget, rounds, score_of, seed, temperature, quality=None, quality_temperature=1.0):
    n, k = len(labels), int(labels.max()) + 1
    sizes = [int((labels == j).sum()) for j in range(k)]
    weights = [1.0 / k] * k
    available = [True] * n
    selections, weight_history = [], []
    for r in range(rounds):
        rng = np.random.default_rng([seed] if r == 0 else [seed, r])
        keys = rng.gumbel(size=n)
        if quality is not None:
            keys = keys + quality / quality_temperature
        capacity = [sum(1 for i in range(n) if available[i] and labels[i] == j) for j in range(k)]
        quota = naive_allocate(budget, [weights[j] * sizes[j] for j in range(k)], capacity)
        chosen = []
        for j in range(k):
            candidates = sorted(
                (i for i in range(n) if available[i] and labels[i] == j), key=lambda i: (-keys[i], i)
            )
            chosen.extend(candidates[: quota[j]])
        chosen.sort()
        for i in chosen:
            available[i] = False
        selections.append(chosen)
        # paper: cluster score = mean S_i of its scored rows; w <- w * softmax(s / T), renormalised
        means = {}
        for j in range(k):
            values = [score_of(i) for i in chosen if labels[i] == j]
            if values:
                means[j] = sum(values) / len(values)
        if len(means) == k:
            logits = np.array([means[j] / temperature for j in range(k)])
            softmax = np.exp(logits) / np.exp(logits).sum()
            new = [weights[j] * softmax[j] for j in range(k)]
        else:  # unscored clusters keep their weight; scored ones share theirs ∝ w·exp(s/T)
            mass = sum(weights[j] for j in means)
            raw = {j: weights[j] * np.exp(means[j] / temperature) for j in means}
            new = [raw[j] * mass / sum(raw.values()) if j in means else weights[j] for j in range(k)]
        weights = [w / sum(new) for w in new]
        weight_history.append(weights)
    return selections, weight_history


def _labels(seed=0, n=90, k=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, size=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_naive_reference(seed):
    labels = _labels(seed)
    row_scores = np.random.default_rng(seed + 10).normal(size=len(labels)) + labels * 0.3
    expected, expected_weights = naive_rounds(labels, 12, 4, lambda i: row_scores[i], seed, temperature=0.5)

    engine = IterativeKMQ(labels, 12, rounds=4, temperature=0.5, seed=seed)
    previous = None
    for r in range(4):
        positions = engine.next_round(None if previous is None else row_scores[previous])
        assert positions.tolist() == expected[r]
        previous = positions
    engine.update(row_scores[previous])
    for record, weights in zip(engine.history, expected_weights, strict=True):
        np.testing.assert_allclose(record.weights_after, weights, rtol=1e-12)


def test_matches_the_naive_reference_with_quality_and_small_clusters():
    labels = np.array([0] * 40 + [1] * 5 + [2] * 30 + [3] * 2)  # clusters 1 and 3 run out quickly
    quality = np.random.default_rng(3).normal(size=len(labels))
    row_scores = np.where(labels == 1, 3.0, 0.0) + np.where(labels == 3, 5.0, 0.0)
    expected, _ = naive_rounds(labels, 10, 5, lambda i: row_scores[i], 7, 1.0, quality, 0.5)
    engine = IterativeKMQ(labels, 10, temperature=1.0, quality=quality, quality_temperature=0.5, seed=7)
    got = [engine.next_round()]
    for _ in range(4):
        got.append(engine.next_round(row_scores[got[-1]]))
    assert [g.tolist() for g in got] == expected
    assert engine.remaining_per_cluster()[[1, 3]].tolist() == [0, 0]  # exhausted, their share re-allocated
    assert all(len(g) == 10 for g in got)


def test_round_zero_is_static_kmq():
    labels = _labels(4, n=120, k=6)
    quality = np.random.default_rng(0).normal(size=120)
    pool = Dataset.from_dict(
        {"cluster": labels, "quality": quality, "text": [f"row {i}" for i in range(120)]}
    )
    static = select(pool, "kmq", budget=25, seed=9, quality_column="quality", temperature=0.7)
    engine = IterativeKMQ(labels, 25, quality=quality, quality_temperature=0.7, seed=9)
    assert engine.next_round().tolist() == sorted(static.positions.tolist())


def test_reweight_formula():
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    scores = np.array([1.0, -1.0, 0.5, 2.0])
    softmax = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum()
    expected = weights * softmax / (weights * softmax).sum()
    np.testing.assert_allclose(reweight(weights, scores, 0.5), expected, rtol=1e-12)
    # unscored clusters keep their weight exactly; the scored ones share the rest ∝ w · exp(s / T)
    partial = reweight(weights, np.array([1.0, np.nan, 0.0, np.nan]), 1.0)
    assert partial[1] == pytest.approx(0.2) and partial[3] == pytest.approx(0.4)
    assert partial[0] / partial[2] == pytest.approx(0.1 * np.e / 0.3)
    assert partial.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(reweight(weights, np.full(4, np.nan), 1.0), weights)
    # huge scores do not overflow
    assert np.isfinite(reweight(weights, np.array([1e4, 0, 0, 0]), 0.01)).all()


def test_uniform_weights_split_like_kmq_and_weights_shift_the_split():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    engine = IterativeKMQ(labels, 10, seed=0)
    engine.next_round()
    assert engine.history[0].quota.tolist() == [5, 3, 2]  # ∝ cluster size
    engine.next_round(np.where(labels[engine.history[0].positions] == 2, 2.0, 0.0))
    assert engine.history[1].quota[2] > 2  # the high-scoring cluster gets more


def test_scores_as_a_mapping_for_a_subset():
    labels = np.repeat([0, 1, 2], 10)
    engine = IterativeKMQ(labels, 6, seed=0)
    first = engine.next_round()
    in_cluster_0 = [int(p) for p in first if labels[p] == 0]
    engine.update({in_cluster_0[0]: 4.0})
    assert engine.history[0].cluster_scores[0] == 4.0
    assert np.isnan(engine.history[0].cluster_scores[1:]).all()
    assert engine.weights[1] == pytest.approx(1 / 3) and engine.weights[0] == pytest.approx(1 / 3)


def test_multinomial_allocation():
    rng = np.random.default_rng(0)
    capacities = np.array([100, 3, 100, 0])
    draws = np.array(
        [allocate_multinomial(rng, 50, np.array([1.0, 10.0, 1.0, 5.0]), capacities) for _ in range(200)]
    )
    assert (draws.sum(axis=1) == 50).all()
    assert (draws <= capacities).all() and (draws[:, 3] == 0).all()
    assert (draws[:, 1] == 3).mean() > 0.9  # heavy weight, small capacity: filled almost always
    labels = _labels(1)
    a = IterativeKMQ(labels, 15, allocation="multinomial", seed=4)
    b = IterativeKMQ(labels, 15, allocation="multinomial", seed=4)
    scores = np.linspace(-1, 1, 15)
    assert a.next_round().tolist() == b.next_round().tolist()
    assert a.next_round(scores).tolist() == b.next_round(scores).tolist()


def test_state_round_trip_and_continuation():
    labels = _labels(5)
    row_scores = np.random.default_rng(5).normal(size=len(labels))
    engine = IterativeKMQ(labels, 9, rounds=5, temperature=0.3, seed=11, exclude=np.array([0, 1, 2]))
    positions = engine.next_round()
    positions = engine.next_round(row_scores[positions])
    positions = engine.next_round(row_scores[positions])
    state = json.loads(json.dumps(engine.state_dict()))  # JSON-able, small
    assert all("positions" not in r for r in state["rounds"])  # only weights and digests

    restored = IterativeKMQ(labels, 9, rounds=5, temperature=0.3, seed=11, exclude=np.array([0, 1, 2]))
    restored.load_state_dict(state)
    assert [r.positions.tolist() for r in restored.history] == [r.positions.tolist() for r in engine.history]
    np.testing.assert_array_equal(restored.weights, engine.weights)
    assert (
        restored.next_round(row_scores[positions]).tolist()
        == engine.next_round(row_scores[positions]).tolist()
    )
    assert not {0, 1, 2} & set(engine.selected.tolist())

    other_seed = IterativeKMQ(labels, 9, rounds=5, temperature=0.3, seed=12, exclude=np.array([0, 1, 2]))
    with pytest.raises(InputError, match="seed: saved 11, now 12"):
        other_seed.load_state_dict(state)


def test_errors():
    labels = np.repeat([0, 1], 10)
    with pytest.raises(InputError, match="larger than the pool"):
        IterativeKMQ(labels, 21)
    with pytest.raises(InputError, match=r"3 rounds × 8 rows = 24 rows, but the pool has 20"):
        IterativeKMQ(labels, 8, rounds=3)
    with pytest.raises(InputError, match="allocation"):
        IterativeKMQ(labels, 4, allocation="equal")
    with pytest.raises(InputError, match="temperature"):
        IterativeKMQ(labels, 4, temperature=0)
    with pytest.raises(InputError, match="integer cluster ids"):
        IterativeKMQ(labels + 0.5, 4)
    engine = IterativeKMQ(labels, 4)
    with pytest.raises(InputError, match="without scores"):
        engine.next_round([1.0] * 4)
    first = engine.next_round()
    with pytest.raises(InputError, match="needs the scores"):
        engine.next_round()
    with pytest.raises(InputError, match="NaN or infinite scores for 1 row"):
        engine.update([0.0, np.nan, 1.0, 2.0])
    with pytest.raises(InputError, match="Got 3 scores for the 4 rows"):
        engine.update([0.0, 1.0, 2.0])
    outside = next(p for p in range(20) if p not in set(first.tolist()))
    with pytest.raises(InputError, match="outside the last round"):
        engine.update({outside: 1.0})
    engine.update([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="already been scored"):
        engine.update([0.0, 1.0, 2.0, 3.0])
    for _ in range(4):
        engine.select()
    with pytest.raises(InputError, match="only 0 unselected rows"):
        engine.select()


# -- the offline `iterative-kmq` method -----------------------------------------------------------------------
def _scored_pool():
    labels = np.repeat([0, 1, 2, 3], 25)
    score = np.where(labels == 3, -2.0, 0.0) + np.random.default_rng(0).normal(scale=0.1, size=100)
    return (
        Dataset.from_dict(
            {
                "instruction": [f"do {i}" for i in range(100)],
                "output": ["ok"] * 100,
                "cluster": labels,
                "gap": score,
            }
        ),
        labels,
        score,
    )


def test_offline_method_equals_the_engine():
    pool, labels, score = _scored_pool()
    result = select(pool, "iterative-kmq", budget=31, seed=3, score_column="gap", rounds=3, temperature=0.5)
    engine = IterativeKMQ(labels, 11, temperature=0.5, seed=3)
    expected = [engine.select(11)]
    engine.update(score[expected[-1]])
    expected.append(engine.select(10))
    engine.update(score[expected[-1]])
    expected.append(engine.select(10))
    assert result.positions.tolist() == np.concatenate(expected).tolist()
    assert result.scores["round"].tolist() == [0] * 11 + [1] * 10 + [2] * 10
    np.testing.assert_array_equal(result.scores["cluster"], labels[result.positions])
    picked_from_3 = [int((labels[p] == 3).sum()) for p in expected]
    assert picked_from_3[0] >= 2 and picked_from_3[2] < picked_from_3[0]  # low-gap cluster loses rows
    assert result.info["rounds"][0]["weights_after"] is not None


def test_offline_method_errors():
    pool, _, _ = _scored_pool()
    with pytest.raises(InputError, match="needs score_column="):
        select(pool, "iterative-kmq", budget=10)
    with pytest.raises(InputError, match="smaller than the number of rounds"):
        select(pool, "iterative-kmq", budget=2, score_column="gap", rounds=3)
    with pytest.raises(InputError, match="must be numeric"):
        select(pool, "iterative-kmq", budget=10, score_column="output")
