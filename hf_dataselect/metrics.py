"""Diversity and coverage measures of a selection (what ``hf-dataselect compare`` reports).

Each function takes the selected row positions and the pool-wide array it measures against, so a measure is
computed the same way whatever method produced the selection:

* :func:`feature_coverage` — distinct SAE latents active in at least one selected row;
* :func:`cluster_coverage` — clusters (of a reference clustering) with at least one selected row;
* :func:`label_distribution` — hidden labels covered and the entropy of the selection's label distribution;
* :func:`exact_duplicate_share` — selected rows whose text occurs more than once in the selection (after
  collapsing whitespace);
* :func:`near_duplicate_share` — selected rows that have *another* selected row at cosine similarity
  ``>= 0.95`` on L2-normalised embeddings (exact all-pairs search with faiss, chunked);
* :func:`mean_length` — mean of a per-row length (tokens).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hf_dataselect.selection.sparse_features import SparseFeatures

NEAR_DUPLICATE_COSINE = 0.95


def feature_coverage(features: SparseFeatures, positions: np.ndarray) -> dict[str, Any]:
    """Latents covered by the selection, against the latents active anywhere in the pool."""
    covered = int(features.covered(np.asarray(positions, dtype=np.int64)).sum())
    active = int(np.count_nonzero(features.latent_frequencies()))
    return {"covered": covered, "active_in_pool": active, "share": covered / active if active else 0.0}


def cluster_coverage(clusters: np.ndarray, positions: np.ndarray) -> dict[str, Any]:
    """Clusters with at least one selected row, against the clusters of the pool."""
    clusters = np.asarray(clusters)
    total = len(np.unique(clusters))
    covered = len(np.unique(clusters[np.asarray(positions, dtype=np.int64)]))
    return {"covered": covered, "total": total, "share": covered / total if total else 0.0}


def label_distribution(labels: Sequence[Any], positions: np.ndarray) -> dict[str, Any]:
    """Labels covered, entropy (bits) of the selection's label distribution, and its normalised form.

    ``normalized_entropy`` divides by ``log2`` of the number of labels in the pool: 1.0 means the selection is
    spread evenly over every label, 0 that it comes from a single label.
    """
    pool_counts = Counter(labels)
    picked = Counter(labels[int(p)] for p in np.asarray(positions, dtype=np.int64))
    entropy = _entropy_bits(np.array(list(picked.values()), dtype=np.float64))
    most, most_count = picked.most_common(1)[0] if picked else (None, 0)
    return {
        "covered": len(picked),
        "total": len(pool_counts),
        "share": len(picked) / len(pool_counts) if pool_counts else 0.0,
        "entropy_bits": entropy,
        "normalized_entropy": entropy / math.log2(len(pool_counts)) if len(pool_counts) > 1 else 0.0,
        "pool_entropy_bits": _entropy_bits(np.array(list(pool_counts.values()), dtype=np.float64)),
        "largest_label": most,
        "largest_label_share": most_count / max(sum(picked.values()), 1),
        "counts": dict(sorted(picked.items(), key=lambda item: (-item[1], str(item[0])))),
    }


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return max(0.0, float(-(p * np.log2(p)).sum()))


def exact_duplicate_share(texts: Sequence[str], positions: np.ndarray) -> float:
    """Share of selected rows whose text (whitespace collapsed) also appears in another selected row."""
    picked = [" ".join(texts[int(p)].split()) for p in np.asarray(positions, dtype=np.int64)]
    if not picked:
        return 0.0
    counts = Counter(picked)
    return sum(c for c in counts.values() if c > 1) / len(picked)


def near_duplicate_share(
    embeddings: np.ndarray, positions: np.ndarray, threshold: float = NEAR_DUPLICATE_COSINE
) -> float:
    """Share of selected rows with another selected row at cosine similarity ``>= threshold``.

    Exact: every pair of selected rows is compared (faiss inner-product search for the nearest other row,
    which is linear in memory and fast for selections of tens of thousands of rows).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) < 2:
        return 0.0
    return float(np.mean(nearest_other_similarity(embeddings[positions]) >= threshold))


def nearest_other_similarity(vectors: np.ndarray) -> np.ndarray:
    """For each row, the largest cosine similarity to any *other* row of ``vectors``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency; keep a numpy path anyway
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims, ids = index.search(x, 2)
        # the best hit is normally the row itself; take the best hit that is another row
        self_first = ids[:, 0] == np.arange(len(x))
        return np.where(self_first, sims[:, 1], sims[:, 0]).astype(np.float64)
    best = np.full(len(x), -np.inf)
    for start in range(0, len(x), 4096):
        block = x[start : start + 4096] @ x.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        best[start : start + len(block)] = block.max(axis=1)
    return best


def mean_length(lengths: np.ndarray, positions: np.ndarray) -> float:
    positions = np.asarray(positions, dtype=np.int64)
    return float(np.mean(np.asarray(lengths, dtype=np.float64)[positions])) if len(positions) else 0.0


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long arrays (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def selection_metrics(
    positions: np.ndarray,
    *,
    features: SparseFeatures | None = None,
    clusters: np.ndarray | None = None,
    labels: Sequence[Any] | None = None,
    texts: Sequence[str] | None = None,
    embeddings: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    near_duplicate_threshold: float = NEAR_DUPLICATE_COSINE,
) -> dict[str, Any]:
    """Every measure whose input is given, as one flat-ish dict (``None`` inputs are skipped)."""
    out: dict[str, Any] = {"rows": len(positions)}
    if features is not None:
        out["feature_coverage"] = feature_coverage(features, positions)
    if clusters is not None:
        out["cluster_coverage"] = cluster_coverage(clusters, positions)
    if labels is not None:
        out["labels"] = label_distribution(labels, positions)
    if texts is not None:
        out["exact_duplicate_share"] = exact_duplicate_share(texts, positions)
    if embeddings is not None:
        out["near_duplicate_share"] = near_duplicate_share(embeddings, positions, near_duplicate_threshold)
    if lengths is not None:
        out["mean_tokens"] = mean_length(lengths, positions)
    return out
