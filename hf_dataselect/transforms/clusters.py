"""``ClusterIds``: the nearest centroid of a fitted k-means, and the distance to it, for every row.

    kmeans = fit_kmeans(matrix_column(ds, "embedding"), k=100)
    kmeans.save("centroids.safetensors")
    ds = ds.map(ClusterIds("centroids.safetensors"), batched=True)   # adds `cluster` and `cluster_distance`

The transform pickles its configuration and the centroids (or the centroid file's path and content hash),
never a search index, so ``datasets`` fingerprints it deterministically: the same centroids give a cache hit,
refitted centroids (even written to the same path) do not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_dataselect.cluster import KMeans
from hf_dataselect.errors import InputError
from hf_dataselect.transforms.base import MapTransform


@dataclass
class ClusterIds(MapTransform):
    """Adds ``cluster`` (int64, nearest centroid) and ``cluster_distance`` (float32, Euclidean distance)."""

    kmeans: KMeans | str | os.PathLike
    """A fitted :class:`~hf_dataselect.cluster.KMeans`, or the path of one saved with ``KMeans.save``."""
    embedding_column: str = "embedding"
    column: str = "cluster"
    distance_column: str | None = "cluster_distance"
    """Column for the distance to the centroid; ``None`` leaves it out."""
    centroids_sha256: str = field(default="", init=False)
    """Content hash of the centroids (part of the fingerprint; checked when a file is read in a worker)."""

    def __post_init__(self) -> None:
        if isinstance(self.kmeans, KMeans):
            # keep what assignment needs, not the fitted labels/distances of every training row
            centroids = np.ascontiguousarray(self.kmeans.centroids, dtype=np.float32)
            self.kmeans = KMeans(
                centroids=centroids,
                inertia=self.kmeans.inertia,
                seed=self.kmeans.seed,
                backend=self.kmeans.backend,
                niter=self.kmeans.niter,
                n_train=self.kmeans.n_train,
            )
        elif isinstance(self.kmeans, str | os.PathLike):
            path = Path(self.kmeans).expanduser().resolve()
            centroids = KMeans.load(path).centroids  # clear InputError for a missing or foreign file
            self.kmeans = str(path)
        else:
            raise InputError(
                f"ClusterIds needs a fitted KMeans or the path of its safetensors file, got {type(self.kmeans).__name__}."
            )
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise InputError(f"Centroids must be a non-empty [k, dim] matrix, got shape {centroids.shape}.")
        self.centroids_sha256 = _centroid_hash(centroids)
        if self.distance_column == self.column:
            raise InputError("column and distance_column must differ.")

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        model = self.runtime()
        vectors = _batch_matrix(batch, self.embedding_column)
        if vectors.shape[0] == 0:
            labels, distances = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        else:
            if vectors.shape[1] != model.dim:
                raise InputError(
                    f"Column {self.embedding_column!r} holds {vectors.shape[1]}-d vectors but the centroids are "
                    f"{model.dim}-d: were they fitted on embeddings of another model?"
                )
            labels, distances = model.assign(vectors)
        out = {self.column: labels}
        if self.distance_column:
            out[self.distance_column] = distances
        return out

    def _build_runtime(self) -> KMeans:
        from hf_dataselect.cluster import faiss_available
        from hf_dataselect.distributed import configure_faiss_threads, configure_torch_threads

        if faiss_available():
            configure_faiss_threads()
        else:
            configure_torch_threads()
        if isinstance(self.kmeans, KMeans):
            return self.kmeans
        model = KMeans.load(self.kmeans)
        if _centroid_hash(model.centroids) != self.centroids_sha256:
            raise InputError(f"{self.kmeans} changed since this ClusterIds was created; create it again.")
        return model


def _centroid_hash(centroids: np.ndarray) -> str:
    digest = hashlib.sha256(str(centroids.shape).encode())
    digest.update(np.ascontiguousarray(centroids, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _batch_matrix(batch: Any, column: str) -> np.ndarray:
    """The embedding column of a ``.map`` batch (python lists, numpy, torch or Arrow) as float32 ``[n, dim]``."""
    try:
        values = batch[column]
    except (KeyError, TypeError):
        values = None
    if values is None:
        columns = list(batch.keys()) if hasattr(batch, "keys") else getattr(batch, "column_names", [])
        raise InputError(
            f"ClusterIds needs the embedding column {column!r}; the dataset has {list(columns)}. "
            "Add it first with ds.map(Embeddings(), batched=True) or set embedding_column=."
        )
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # Arrow
        import pyarrow as pa

        array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if len(array) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        flat = array.flatten().to_numpy(zero_copy_only=False)
        matrix = flat.astype(np.float32, copy=False).reshape(len(array), -1)
    elif hasattr(values, "detach"):  # torch
        matrix = values.detach().cpu().float().numpy()
    else:
        if len(values) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            matrix = np.asarray(values, dtype=np.float32)
        except ValueError as err:
            raise InputError(f"Column {column!r} holds vectors of different lengths: {err}") from err
    if matrix.ndim != 2:
        raise InputError(
            f"Column {column!r} must hold one vector per row, got an array of shape {matrix.shape}."
        )
    if not np.isfinite(matrix).all():
        raise InputError(f"Column {column!r} has NaN or infinite values.")
    return matrix
