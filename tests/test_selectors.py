"""Exact budgets, determinism and known answers for the core selectors (no models loaded here)."""

import numpy as np
import pytest
from datasets import Dataset

from hf_dataselect import select
from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import resolve_budget


def clustered_pool(sizes=(50, 30, 20), dim=8, seed=0, quality=None):
    """Rows in well-separated Gaussian blobs with a precomputed, normalised `embedding` column."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 10
    vectors, clusters = [], []
    for c, size in enumerate(sizes):
        vectors.append(centres[c] + rng.normal(scale=0.3, size=(size, dim)))
        clusters += [c] * size
    x = np.concatenate(vectors).astype(np.float32)
    n = len(x)
    data = {
        "prompt": [f"prompt {i}" for i in range(n)],
        "completion": [" ".join(["word"] * (i % 17 + 1)) for i in range(n)],
        "embedding": x.tolist(),
        "true_cluster": clusters,
    }
    if quality is not None:
        data["quality"] = quality(n)
    return Dataset.from_dict(data)


# -- budget rule ------------------------------------------------------------------------------------------
def test_resolve_budget():
    assert resolve_budget(10, 100) == 10
    assert resolve_budget(0.05, 1000) == 50
    assert resolve_budget(0.0001, 100) == 1
    assert resolve_budget(1.0, 7) == 7
    assert resolve_budget(20.0, 100) == 20
    for bad, message in [
        (0, "at least 1"),
        (-3, "at least 1"),
        (101, "larger than the pool"),
        (1.5, "neither a fraction"),
        (float("nan"), "positive"),
        (True, "number of rows"),
        ("10", "number of rows"),
    ]:
        with pytest.raises(InputError, match=message):
            resolve_budget(bad, 100)


ALL_OFFLINE_METHODS = [
    ("random", {}),
    ("longest", {"length_column": "length"}),
    ("kcenter", {}),
    ("kmq", {"k": 3}),
    ("kmq-random", {"k": 3}),
    ("kmq-closest", {"k": 3}),
    ("kmq", {"k": 3, "quality_column": "quality"}),
]


@pytest.mark.parametrize(("method", "options"), ALL_OFFLINE_METHODS)
@pytest.mark.parametrize("budget", [1, 17, 100])
def test_exact_budget_distinct_and_deterministic(method, options, budget):
    pool = clustered_pool(quality=lambda n: np.linspace(0, 1, n).tolist())
    pool = pool.add_column("length", [float(i % 11) for i in range(len(pool))])
    first = select(pool, method, budget, seed=3, **options)
    again = select(pool, method, budget, seed=3, **options)
    assert len(first.positions) == budget
    assert len(set(first.positions.tolist())) == budget
    np.testing.assert_array_equal(first.positions, again.positions)
    assert len(first.dataset) == budget


def test_random_depends_on_seed_and_fraction_budget():
    pool = clustered_pool()
    a = select(pool, "random", 0.2, seed=0)
    b = select(pool, "random", 0.2, seed=1)
    assert len(a) == 20
    assert a.positions.tolist() != b.positions.tolist()


def test_kmq_is_proportional_to_cluster_sizes():
    pool = clustered_pool(sizes=(50, 30, 20))
    result = select(pool, "kmq", 10, k=3)
    picked = np.bincount(np.asarray(pool["true_cluster"])[result.positions], minlength=3)
    assert sorted(picked.tolist(), reverse=True) == [5, 3, 2]
    assert sorted(result.info["cluster_sizes"].tolist()) == [20, 30, 50]
    assert result.summary()["clusters"] == 3


def test_kmq_with_given_clusters_uses_largest_remainder():
    pool = Dataset.from_dict({"text": [f"t{i}" for i in range(21)], "cluster": [0] + [1] * 10 + [2] * 10})
    result = select(pool, "kmq", 12)  # shares 12/21 * (1, 10, 10) = 0.57, 5.71, 5.71 -> 0, 6, 6
    assert np.bincount(np.asarray(pool["cluster"])[result.positions], minlength=3).tolist() == [0, 6, 6]
    assert result.info["clustering"]["source"] == "column 'cluster'"


def test_kmq_quality_weighting_prefers_high_quality():
    quality = lambda n: [float(i % 10) for i in range(n)]  # noqa: E731
    pool = clustered_pool(sizes=(60, 40), quality=quality)
    cold = select(pool, "kmq", 20, k=2, quality_column="quality", temperature=0.01)
    picked_quality = np.asarray(pool["quality"])[cold.positions]
    assert picked_quality.min() >= 8.0  # at T -> 0 sampling takes the best rows of each cluster
    uniform = select(pool, "kmq-random", 20, k=2, seed=0)
    assert np.asarray(pool["quality"])[uniform.positions].mean() < picked_quality.mean()
    assert "quality" in cold.scores


def test_kmq_quality_sampling_matches_softmax_over_many_seeds():
    """Within one cluster, a 1-row draw picks row i with probability ∝ exp(q_i / T)."""
    pool = Dataset.from_dict({"text": ["a", "b", "c"], "cluster": [0, 0, 0], "q": [0.0, 1.0, 2.0]})
    counts = np.zeros(3)
    for seed in range(3000):
        counts[select(pool, "kmq", 1, seed=seed, quality_column="q", temperature=1.0).positions[0]] += 1
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.03)


def test_kmq_closest_takes_rows_nearest_the_centroid():
    pool = clustered_pool(sizes=(40, 40))
    result = select(pool, "kmq-closest", 4, k=2)
    distances = np.asarray(result.pool["cluster_distance"])
    clusters = np.asarray(result.pool["cluster"])
    for c in range(2):
        members = np.flatnonzero(clusters == c)
        nearest = members[np.argsort(distances[members], kind="stable")[:2]]
        assert set(nearest.tolist()) <= set(result.positions.tolist())


def test_longest_uses_token_counts_and_breaks_ties_by_position():
    pool = Dataset.from_dict({"prompt": ["p"] * 5, "completion": ["a b", "a b c d", "a", "a b c d", "a b c"]})
    result = select(pool, "longest", 3)
    assert result.positions.tolist() == [1, 3, 4]
    assert result.scores["response_tokens"].tolist() == [4.0, 4.0, 3.0]


def test_kcenter_matches_naive_farthest_first():
    pool = clustered_pool(sizes=(30, 30, 30), seed=2)
    result = select(pool, "kcenter", 12, seed=5)
    x = np.asarray(pool["embedding"], dtype=np.float64)
    chosen = [int(result.positions[0])]
    for _ in range(11):
        d = np.min(np.linalg.norm(x[:, None, :] - x[chosen][None], axis=2), axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    assert result.positions.tolist() == chosen
    assert len({pool["true_cluster"][i] for i in chosen[:3]}) == 3  # the first picks span all blobs


def test_kcenter_start_depends_on_seed():
    pool = clustered_pool()
    assert {select(pool, "kcenter", 1, seed=s).positions[0] for s in range(5)} != {0}


# -- errors before any work ------------------------------------------------------------------------------
def test_unknown_method_and_option():
    pool = clustered_pool()
    with pytest.raises(InputError, match=r"Unknown selection method 'kmeans'.*available: .*kmq"):
        select(pool, "kmeans", 3)
    with pytest.raises(InputError, match=r"no option\(s\) \['kk'\]"):
        select(pool, "kmq", 3, kk=2)
    with pytest.raises(InputError, match="fixes"):
        select(pool, "kmq-closest", 3, variant="random")


def test_bad_inputs_fail_before_work():
    pool = clustered_pool()
    with pytest.raises(InputError, match="larger than the pool"):
        select(pool, "kmq", 1000)
    with pytest.raises(InputError, match="k=500 clusters is larger than the pool"):
        select(pool, "kmq", 10, k=500)
    with pytest.raises(InputError, match="must be numeric"):
        select(pool.add_column("q", ["x"] * len(pool)), "kmq", 10, k=3, quality_column="q")
    with pytest.raises(InputError, match="temperature"):
        select(pool, "kmq", 10, k=3, temperature=0)
    nan_pool = pool.map(
        lambda row, i: {"embedding": [float("nan")] * 8 if i == 4 else row["embedding"]}, with_indices=True
    )
    with pytest.raises(InputError, match="NaN"):
        select(nan_pool, "kmq", 10, k=3)
    with pytest.raises(InputError, match="pool is empty"):
        select(pool.select([]), "random", 1)


def test_missing_text_is_reported_before_embedding(monkeypatch):
    import hf_dataselect.transforms.embed as embed

    def fail(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded")

    monkeypatch.setattr(embed.Embeddings, "_build_runtime", fail)
    pool = Dataset.from_dict({"prompt": ["a", "", "c"], "completion": ["x", "", "z"]})
    with pytest.raises(InputError, match=r"no text.*\[1\]"):
        select(pool, "kmq", 2, k=2)
    with pytest.raises(InputError, match="Cannot tell how to read rows"):
        select(Dataset.from_dict({"foo": ["a", "b"]}), "kcenter", 1)
