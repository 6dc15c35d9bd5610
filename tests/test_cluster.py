"""k-means backends, silhouette choice of k, save/load, determinism and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from hf_dataselect.cluster import (
    KMeans,
    _torch_train,
    choose_k,
    default_k_grid,
    faiss_available,
    fit_kmeans,
    initial_centroids,
)
from hf_dataselect.errors import InputError

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def blobs(n: int = 1200, centres: int = 4, dim: int = 16, spread: float = 0.4, seed: int = 0):
    """Well-separated Gaussian blobs and their true labels."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, size=n)
    x = (means[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32)
    return x, labels


def true_inertia(x: np.ndarray, labels: np.ndarray) -> float:
    means = np.stack([x[labels == c].mean(0) for c in np.unique(labels)])
    return float(((x - means[labels]) ** 2).sum())


def naive_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sq = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return sq.argmin(1), np.sqrt(sq.min(1))


def naive_lloyd(x: np.ndarray, start: np.ndarray, niter: int) -> np.ndarray:
    """Textbook Lloyd iterations from ``start``."""
    centroids = start.astype(np.float64)
    k = len(start)
    for _ in range(niter):
        labels, _ = naive_assign(x, centroids)
        centroids = np.stack(
            [x[labels == c].mean(0) if (labels == c).any() else centroids[c] for c in range(k)]
        )
    return centroids


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_backends_reach_the_true_partition(backend):
    x, labels = blobs()
    for seed in range(5):  # random seeding fails on this data for 2 of these seeds; k-means++ never
        model = fit_kmeans(x, 4, seed=seed, backend=backend)
        assert model.backend == backend and model.k == 4 and model.n_train == len(x)
        assert model.inertia == pytest.approx(true_inertia(x, labels), rel=1e-4)
        # same partition as the truth, up to renaming the clusters
        assert len({(a, b) for a, b in zip(model.labels, labels, strict=True)}) == 4


@needs_faiss
def test_torch_and_faiss_inertia_agree_on_overlapping_blobs():
    x, _ = blobs(n=3000, centres=12, dim=8, spread=3.0, seed=3)
    faiss_model = fit_kmeans(x, 12, seed=0, backend="faiss", niter=30)
    torch_model = fit_kmeans(x, 12, seed=0, backend="torch", niter=30)
    assert torch_model.inertia == pytest.approx(faiss_model.inertia, rel=0.03)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_torch_backend_equals_naive_lloyd(init):
    x, _ = blobs(n=400, centres=5, dim=6, spread=2.5, seed=1)
    start = initial_centroids(x, 5, seed=7, init=init)
    np.testing.assert_allclose(_torch_train(x, start, niter=6), naive_lloyd(x, start, niter=6), atol=1e-4)


def test_kmeans_plus_plus_spreads_the_start_over_the_blobs():
    x, labels = blobs(n=2000, centres=8, dim=8, spread=0.3, seed=11)
    for seed in range(5):
        start = initial_centroids(x, 8, seed=seed)
        nearest_blob = ((start[:, None] - x[None]) ** 2).sum(-1).argmin(1)
        assert len(set(labels[nearest_blob].tolist())) == 8  # one starting centroid in every blob
    duplicates = np.repeat(x[:3], 4, axis=0)  # 3 distinct rows, k = 5: no crash, the 3 rows all used
    start = initial_centroids(duplicates, 5, seed=0)
    assert len(np.unique(start, axis=0)) == 3


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_random_init_is_available_and_recorded(backend):
    x, _ = blobs(n=300, centres=3, dim=4)
    model = fit_kmeans(x, 3, seed=0, backend=backend, init="random")
    assert model.init == "random" and model.metadata()["init"] == "random"


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_labels_distances_and_inertia_are_exact(backend):
    x, _ = blobs(n=500, centres=6, dim=5, spread=2.0, seed=2)
    model = fit_kmeans(x, 6, seed=0, backend=backend)
    labels, distances = naive_assign(x, model.centroids)
    np.testing.assert_array_equal(model.labels, labels)
    np.testing.assert_allclose(model.distances, distances, rtol=1e-4, atol=1e-4)
    assert model.inertia == pytest.approx(float((distances**2).sum()), rel=1e-5)
    assert model.labels.dtype == np.int64 and model.distances.dtype == np.float32


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_same_seed_same_result_other_seed_other_start(backend):
    x, _ = blobs(n=800, centres=8, dim=8, spread=3.0, seed=4)
    a = fit_kmeans(x, 8, seed=5, backend=backend, niter=5)
    b = fit_kmeans(x, 8, seed=5, backend=backend, niter=5)
    c = fit_kmeans(x, 8, seed=6, backend=backend, niter=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.centroids, c.centroids)


def test_subsampling_is_recorded():
    x, _ = blobs(n=1000, centres=4, dim=4)
    model = fit_kmeans(x, 4, seed=0, max_points_per_centroid=50)
    assert model.n_train == 200
    assert len(model.labels) == 1000  # labels and inertia still cover every point


def test_choose_k_recovers_the_true_k():
    x, _ = blobs(n=1500, centres=6, dim=10, spread=0.5, seed=8)
    best, scores = choose_k(x, list(range(2, 11)), seed=0)
    assert best == 6
    assert sorted(scores) == list(range(2, 11))
    assert scores[6] == max(scores.values()) and scores[6] > 0.8


def test_choose_k_warns_when_the_best_k_is_the_largest_candidate(caplog):
    x, _ = blobs(n=1500, centres=6, dim=10, spread=0.5, seed=8)
    with caplog.at_level("WARNING", logger="hf_dataselect.cluster"):
        best, _ = choose_k(x, [2, 3, 4], seed=0)
    assert best == 4
    assert "largest candidate k=4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_dataselect.cluster"):
        choose_k(x, list(range(2, 11)), seed=0)
    assert "largest candidate" not in caplog.text


def test_choose_k_on_a_sample_and_default_grid():
    x, _ = blobs(n=3000, centres=3, dim=4, spread=0.3, seed=9)
    best, scores = choose_k(x, [2, 3, 4, 5], sample_size=600, seed=1)
    assert best == 3 and sorted(scores) == [2, 3, 4, 5]
    assert default_k_grid(20_000) == [25, 50, 100, 200, 400]
    assert all(2 <= k <= 9 for k in default_k_grid(10))


def test_save_load_round_trip(tmp_path):
    x, _ = blobs(n=600, centres=5, dim=6)
    model = fit_kmeans(x, 5, seed=3, niter=7)
    model.silhouette = {4: 0.5, 5: 0.75}
    path = model.save(tmp_path / "nested" / "centroids.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = KMeans.load(path)
    np.testing.assert_array_equal(loaded.centroids, model.centroids)
    assert loaded.metadata() == model.metadata()
    assert (loaded.seed, loaded.backend, loaded.niter, loaded.k) == (3, model.backend, 7, 5)
    np.testing.assert_array_equal(loaded.assign(x)[0], model.labels)


def test_load_errors(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(InputError, match="No centroid file"):
        KMeans.load(tmp_path / "missing.safetensors")
    save_file({"weights": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not 'centroids'"):
        KMeans.load(tmp_path / "other.safetensors")


def test_bad_input():
    x, _ = blobs(n=10, centres=2, dim=3)
    with pytest.raises(InputError, match="larger than the number of rows"):
        fit_kmeans(x, 11)
    with pytest.raises(InputError, match="positive integer"):
        fit_kmeans(x, 0)
    with pytest.raises(InputError, match="positive integer"):
        fit_kmeans(x, 2.5)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        fit_kmeans(bad, 2)
    with pytest.raises(InputError, match="2-D array"):
        fit_kmeans(x[0], 1)
    with pytest.raises(InputError, match="Unknown k-means init"):
        fit_kmeans(x, 2, init="kmeans||")
    with pytest.raises(InputError, match="Unknown k-means backend"):
        fit_kmeans(x, 2, backend="cuml")
    model = fit_kmeans(x, 2, backend="torch")
    with pytest.raises(InputError, match="dimension 4 but the centroids have 3"):
        model.assign(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(InputError, match="at least 3 rows"):
        choose_k(x[:2])
    with pytest.raises(InputError, match="No candidate k"):
        choose_k(x, [1, 50])
