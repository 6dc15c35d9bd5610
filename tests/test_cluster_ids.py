"""ClusterIds: equality with KMeans.assign, centroid file or in-memory model, caching, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hf_dataselect.cluster import KMeans, fit_kmeans
from hf_dataselect.errors import InputError
from hf_dataselect.transforms.clusters import ClusterIds


def vectors(n: int = 240, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(6, dim))
    return (centres[rng.integers(0, 6, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def pool():
    from datasets import Dataset

    x = vectors()
    return Dataset.from_dict({"id": list(range(len(x))), "embedding": x.tolist()}), x


@pytest.fixture(scope="module")
def kmeans(pool):
    return fit_kmeans(pool[1], 6, seed=0)


def test_map_equals_kmeans_assign(pool, kmeans):
    dataset, x = pool
    mapped = dataset.map(ClusterIds(kmeans), batched=True, batch_size=50)
    labels, distances = kmeans.assign(x)
    np.testing.assert_array_equal(np.array(mapped["cluster"]), labels)
    np.testing.assert_allclose(np.array(mapped["cluster_distance"]), distances, rtol=1e-6)
    assert mapped.features["cluster"].dtype == "int64"
    assert mapped.features["cluster_distance"].dtype == "float32"
    np.testing.assert_array_equal(labels, kmeans.labels)  # the fitted labels are the assignment


def test_from_a_saved_file_and_custom_columns(tmp_path, pool, kmeans):
    dataset, x = pool
    path = kmeans.save(tmp_path / "centroids.safetensors")
    renamed = dataset.rename_column("embedding", "vec")
    mapped = renamed.map(
        ClusterIds(path, embedding_column="vec", column="topic", distance_column=None), batched=True
    )
    assert "topic" in mapped.column_names and "cluster_distance" not in mapped.column_names
    np.testing.assert_array_equal(np.array(mapped["topic"]), kmeans.assign(x)[0])


def test_numpy_and_arrow_formatted_batches(pool, kmeans):
    dataset, x = pool
    transform = ClusterIds(kmeans)
    expected = kmeans.assign(x[:10])[0]
    np.testing.assert_array_equal(transform(dataset.with_format("numpy")[:10])["cluster"], expected)
    np.testing.assert_array_equal(transform(dataset.with_format("arrow")[:10])["cluster"], expected)
    np.testing.assert_array_equal(transform(dataset.with_format("torch")[:10])["cluster"], expected)
    empty = transform({"embedding": []})
    assert empty["cluster"].shape == (0,) and empty["cluster_distance"].dtype == np.float32


def test_pickled_state_holds_centroids_not_an_index(tmp_path, pool, kmeans):
    in_memory = ClusterIds(kmeans)
    in_memory(pool[0][:5])  # builds the runtime
    state = in_memory.__getstate__()
    assert not any(k.startswith("_runtime") for k in state)
    assert state["kmeans"].labels is None and state["kmeans"].distances is None  # not the fitted rows
    from_file = ClusterIds(kmeans.save(tmp_path / "c.safetensors"))
    assert isinstance(from_file.kmeans, str) and len(pickle.dumps(from_file)) < 1000
    assert from_file.centroids_sha256 == in_memory.centroids_sha256


def test_cache_hit_and_miss(tmp_path, pool, kmeans, monkeypatch):
    from datasets import load_from_disk

    pool[0].save_to_disk(str(tmp_path / "pool"))
    path = kmeans.save(tmp_path / "centroids.safetensors")
    calls = []
    real_assign = KMeans.assign
    monkeypatch.setattr(KMeans, "assign", lambda self, x: calls.append(len(x)) or real_assign(self, x))

    first = load_from_disk(str(tmp_path / "pool")).map(ClusterIds(path), batched=True)
    assert calls
    calls.clear()
    second = load_from_disk(str(tmp_path / "pool")).map(ClusterIds(str(path)), batched=True)
    assert not calls and second.cache_files == first.cache_files
    # an in-memory model is fingerprinted by its centroids and facts: the loaded copy hits the same cache
    in_memory = load_from_disk(str(tmp_path / "pool")).map(ClusterIds(kmeans), batched=True)
    calls.clear()
    loaded = load_from_disk(str(tmp_path / "pool")).map(ClusterIds(KMeans.load(path)), batched=True)
    assert not calls and loaded.cache_files == in_memory.cache_files

    refit = fit_kmeans(pool[1], 6, seed=1)
    refit.save(path)  # same path, new centroids: must not reuse the old cache
    calls.clear()
    third = load_from_disk(str(tmp_path / "pool")).map(ClusterIds(path), batched=True)
    assert calls and third.cache_files != first.cache_files
    np.testing.assert_array_equal(np.array(third["cluster"]), refit.assign(pool[1])[0])


def test_in_memory_model_fingerprint_is_deterministic(pool, kmeans):
    from datasets.fingerprint import Hasher

    assert Hasher.hash(ClusterIds(kmeans)) == Hasher.hash(ClusterIds(KMeans(**_fields(kmeans))))
    assert Hasher.hash(ClusterIds(kmeans)) != Hasher.hash(ClusterIds(fit_kmeans(pool[1], 6, seed=3)))


def _fields(model: KMeans) -> dict:
    return {
        "centroids": model.centroids.copy(),
        "inertia": model.inertia,
        "seed": model.seed,
        "backend": model.backend,
        "niter": model.niter,
        "n_train": model.n_train,
        "init": model.init,
    }


def test_num_proc(pool, kmeans):
    dataset, x = pool
    mapped = dataset.map(ClusterIds(kmeans), batched=True, batch_size=40, num_proc=2)
    np.testing.assert_array_equal(np.array(mapped["cluster"]), kmeans.assign(x)[0])


def test_errors(tmp_path, pool, kmeans):
    dataset, _ = pool
    with pytest.raises(InputError, match=r"needs the embedding column 'embedding'; the dataset has \['id'\]"):
        dataset.remove_columns("embedding").map(ClusterIds(kmeans), batched=True)
    other_dim = fit_kmeans(vectors(dim=5), 3, seed=0)
    with pytest.raises(InputError, match="8-d vectors but the centroids are 5-d"):
        dataset.map(ClusterIds(other_dim), batched=True)
    with pytest.raises(InputError, match="No centroid file"):
        ClusterIds(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="fitted KMeans or the path"):
        ClusterIds(np.zeros((3, 8)))
    with pytest.raises(InputError, match="must differ"):
        ClusterIds(kmeans, distance_column="cluster")
    with pytest.raises(InputError, match="NaN or infinite"):
        ClusterIds(kmeans)({"embedding": [[float("nan")] * 8]})
    with pytest.raises(InputError, match="different lengths"):
        ClusterIds(kmeans)({"embedding": [[0.0] * 8, [0.0] * 7]})
    path = kmeans.save(tmp_path / "changing.safetensors")
    transform = ClusterIds(path)
    fit_kmeans(pool[1], 6, seed=2).save(path)  # changed before a worker reads it
    with pytest.raises(InputError, match="changed since this ClusterIds was created"):
        transform({"embedding": [[0.0] * 8]})
