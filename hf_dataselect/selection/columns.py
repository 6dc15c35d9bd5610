"""Computing the columns a selector needs when the pool does not have them yet.

Selectors call these from :meth:`~hf_dataselect.selection.base.Selector.prepare`; each one logs what it
computes, so a user who forgot ``ds.map(Embeddings(), batched=True)`` sees why a selection took longer.
Embedding goes through ``dataset.map`` and is cached like any map; clustering adds in-memory columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dataselect.cluster import KMeans
    from hf_dataselect.selection.base import SelectionContext

logger = logging.getLogger("hf_dataselect.selection")


@dataclass
class EmbeddingOptions:
    """Options shared by the selectors that work on embeddings (kMQ, k-center, Deita)."""

    embedding_column: str = "embedding"
    """Column holding the row embeddings; computed with :class:`~hf_dataselect.Embeddings` when missing."""
    embedding_model: str | None = None
    """Encoder used when embeddings are computed (``None``: the offline all-MiniLM-L6-v2)."""
    embedding_text: str = "prompt_response"
    """Text that is embedded when embeddings are computed: ``prompt_response``, ``prompt`` or ``response``."""
    embedding_batch_size: int = 128
    """Rows per encoder forward pass when embeddings are computed (the :class:`~hf_dataselect.Embeddings` default)."""

    def needs_embeddings(self, dataset: Dataset) -> bool:
        return self.embedding_column not in dataset.column_names

    def ensure_embeddings(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        if not self.needs_embeddings(dataset):
            return dataset
        from hf_dataselect.transforms.embed import Embeddings

        row_format = context.row_format
        logger.info(
            "No %r column: embedding %d rows with %s (text: %s).",
            self.embedding_column,
            len(dataset),
            self.embedding_model or "the offline all-MiniLM-L6-v2",
            self.embedding_text,
        )
        transform = Embeddings(
            model=self.embedding_model,
            text=self.embedding_text,
            column=self.embedding_column,
            batch_size=self.embedding_batch_size,
            prompt_column=row_format.prompt_column if row_format.kind == "columns" else None,
            response_column=row_format.response_column if row_format.kind == "columns" else None,
            formatter=row_format.formatter,
        )
        return dataset.map(transform, batched=True, batch_size=1000, desc="Embedding rows")

    def embeddings(self, dataset: Dataset) -> np.ndarray:
        from hf_dataselect.data import matrix_column

        return matrix_column(dataset, self.embedding_column)


@dataclass
class ClusteringOptions(EmbeddingOptions):
    """Options of the selectors that cluster the pool (kMQ, iterative kMQ): reuse a cluster column or run k-means."""

    k: int | None = None
    """Number of clusters; ``None`` chooses it by silhouette over ``k_grid``."""
    k_grid: list[int] | None = None
    """Candidate ``k`` for the silhouette choice (default: around sqrt(n/2), ×¼ … ×4)."""
    cluster_column: str = "cluster"
    """Existing cluster ids to reuse; when absent, k-means runs and adds it (plus ``cluster_distance``)."""
    kmeans_backend: str = "auto"
    kmeans_niter: int = 20
    max_points_per_centroid: int | None = None
    """Train k-means on at most this many points per centroid (faiss-style subsampling); ``None``: all."""
    silhouette_sample_size: int = 10_000

    def fit_clusters(self, dataset: Dataset, seed: int) -> KMeans:
        """k-means on the pool's embeddings with these options (labels and distances included)."""
        kmeans = cluster_pool(
            self.embeddings(dataset),
            k=self.k,
            k_grid=self.k_grid,
            seed=seed,
            backend=self.kmeans_backend,
            niter=self.kmeans_niter,
            max_points_per_centroid=self.max_points_per_centroid,
            silhouette_sample_size=self.silhouette_sample_size,
        )
        assert kmeans.labels is not None and kmeans.distances is not None
        return kmeans


def cluster_pool(
    embeddings: np.ndarray,
    *,
    k: int | None,
    k_grid: list[int] | None,
    seed: int,
    backend: str,
    niter: int,
    max_points_per_centroid: int | None,
    silhouette_sample_size: int,
) -> KMeans:
    """k-means on the pool's embeddings, with ``k`` chosen by silhouette when it is not given."""
    from hf_dataselect.cluster import choose_k, fit_kmeans

    silhouette = None
    if k is None:
        k, silhouette = choose_k(
            embeddings, k_grid, sample_size=silhouette_sample_size, seed=seed, backend=backend, niter=niter
        )
        logger.info("Chose k=%d by silhouette over %s.", k, sorted(silhouette))
    logger.info("k-means: %d rows, k=%d, backend=%s.", len(embeddings), k, backend)
    model = fit_kmeans(
        embeddings,
        k,
        seed=seed,
        backend=backend,
        niter=niter,
        max_points_per_centroid=max_points_per_centroid,
    )
    model.silhouette = silhouette
    return model


def check_k(k: int | None, pool_size: int) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"k must be a positive number of clusters, got {k!r}.")
    if k > pool_size:
        raise InputError(f"k={k} clusters is larger than the pool ({pool_size} rows).")


def cluster_labels(dataset: Dataset, column: str) -> np.ndarray:
    """Cluster ids from a column as int64; they must be non-negative integers."""
    from hf_dataselect.data import numeric_column

    values = numeric_column(dataset, column, purpose="Reading cluster ids")
    if (values < 0).any() or not np.equal(np.mod(values, 1), 0).all():
        raise InputError(f"Column {column!r} must hold non-negative integer cluster ids.")
    return values.astype(np.int64)
