"""k-means for kMQ: faiss when installed, a torch fallback otherwise, and a silhouette choice of ``k``.

faiss trains on a subsample of ``max_points_per_centroid · k`` points by default (256·k); here every point is
used unless the caller sets ``max_points_per_centroid``. The fitted :class:`KMeans` records seed, backend,
``k``, iterations and inertia (sum of squared distances of *all* points to their centroid) and saves its
centroids with safetensors.

About faiss' start-up log ("Could not load library with AVX512 support ... Loading faiss"): faiss-cpu ≥ 1.12
wheels ship one library with *dynamic dispatch* (``faiss.get_compile_options()`` lists ``DD``) and pick the
SIMD level at run time (``faiss.SIMDConfig.get_level_name()`` reports ``AVX512_VPOPCNT`` on this project's
CPUs); the loader still looks for the pre-1.12 per-ISA modules first and logs their absence. Nothing is lost,
so that logger is quietened to warnings. The distance computations of k-means go through BLAS (sgemm) anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
INITS = ("k-means++", "random")
_ASSIGN_CHUNK = 65536
_KMEANSPP_POINTS_PER_CENTROID = 20


def faiss_available() -> bool:
    if "faiss" not in sys.modules:
        loader_log = logging.getLogger("faiss.loader")
        if loader_log.level == logging.NOTSET:  # see the module docstring; a level the user set is kept
            loader_log.setLevel(logging.WARNING)
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class KMeans:
    """Fitted k-means centroids with the facts needed to reproduce and report them."""

    centroids: np.ndarray
    """``[k, dim]`` float32."""
    inertia: float
    seed: int
    backend: str
    niter: int
    n_train: int
    """Number of points the centroids were trained on."""
    init: str = "k-means++"
    """How the starting centroids were drawn (see :func:`fit_kmeans`)."""
    silhouette: dict[int, float] | None = None
    """Silhouette score per candidate ``k`` when ``k`` was chosen by :func:`choose_k`."""
    labels: np.ndarray | None = field(default=None, repr=False)
    """Cluster of every fitted point (int64), when fitted by :func:`fit_kmeans`."""
    distances: np.ndarray | None = field(default=None, repr=False)
    """Euclidean distance of every fitted point to its centroid (float32)."""

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (int64) and Euclidean distance to it (float32) for each row of ``x``."""
        x = _as_matrix(x, "points")
        if x.shape[1] != self.dim:
            raise InputError(f"Points have dimension {x.shape[1]} but the centroids have {self.dim}.")
        if faiss_available():
            import faiss

            index = faiss.IndexFlatL2(self.dim)
            index.add(np.ascontiguousarray(self.centroids, dtype=np.float32))
            sq, labels = index.search(x, 1)
            return labels[:, 0].astype(np.int64), np.sqrt(np.maximum(sq[:, 0], 0)).astype(np.float32)
        return _torch_assign(x, self.centroids)

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly facts about the clustering (for manifests)."""
        meta: dict[str, Any] = {
            "k": self.k,
            "dim": self.dim,
            "inertia": self.inertia,
            "seed": self.seed,
            "backend": self.backend,
            "niter": self.niter,
            "n_train": self.n_train,
            "init": self.init,
        }
        if self.silhouette is not None:
            meta["silhouette"] = {str(k): v for k, v in self.silhouette.items()}
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write the centroids and metadata to one safetensors file (atomically)."""
        from safetensors.numpy import save_file

        path = Path(path)
        with atomic.writing(path) as temporary:
            save_file(
                {"centroids": np.ascontiguousarray(self.centroids, dtype=np.float32)},
                str(temporary),
                metadata={"hf_dataselect_kmeans": json.dumps(self.metadata())},
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> KMeans:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"No centroid file at {path}.")
        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {}).get("hf_dataselect_kmeans", "{}"))
            if "centroids" not in set(handle.keys()):
                raise InputError(f"{path} holds tensors {list(handle.keys())}, not 'centroids'.")
            centroids = handle.get_tensor("centroids")
        silhouette = {int(k): float(v) for k, v in meta.get("silhouette", {}).items()} or None
        return cls(
            centroids=centroids,
            inertia=float(meta.get("inertia", math.nan)),
            seed=int(meta.get("seed", 0)),
            backend=str(meta.get("backend", "unknown")),
            niter=int(meta.get("niter", 0)),
            n_train=int(meta.get("n_train", 0)),
            init=str(meta.get("init", "unknown")),
            silhouette=silhouette,
        )


def fit_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    backend: str = "auto",
    niter: int = 20,
    max_points_per_centroid: int | None = None,
    init: str = "k-means++",
    verbose: bool = False,
) -> KMeans:
    """Lloyd's k-means on the rows of ``x`` (``[n, dim]``) with ``k`` centroids.

    ``max_points_per_centroid``: train on at most this many points per centroid (faiss' subsampling);
    ``None`` uses every point. Labels, distances and inertia are always computed on every point.

    ``init``: ``"k-means++"`` (default) seeds the centroids by k-means++ on a seeded sample of at most
    20·k training points, for both backends; ``"random"`` takes k random points (faiss' own default), which
    often merges well-separated clusters and splits others (a local minimum Lloyd cannot leave). faiss'
    built-in k-means++ would make k sequential passes over *all* points, too slow at a million rows.
    """
    x = _as_matrix(x, "points")
    n = x.shape[0]
    if not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}.")
    if k > n:
        raise InputError(f"k={k} is larger than the number of rows ({n}).")
    if init not in INITS:
        raise InputError(f"Unknown k-means init {init!r}; expected one of {list(INITS)}.")
    if backend not in BACKENDS:
        raise InputError(f"Unknown k-means backend {backend!r}; expected one of {list(BACKENDS)}.")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    elif backend == "faiss" and not faiss_available():
        raise InputError("backend='faiss' but faiss is not installed (pip install faiss-cpu).")

    train = x
    if max_points_per_centroid is not None and n > max_points_per_centroid * k:
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, max_points_per_centroid * k, replace=False))]

    start = initial_centroids(train, int(k), seed=seed, init=init)
    if backend == "faiss":
        centroids = _faiss_train(train, start, seed=seed, niter=niter, verbose=verbose)
    else:
        centroids = _torch_train(train, start, niter=niter)
    model = KMeans(
        centroids=centroids,
        inertia=math.nan,
        seed=seed,
        backend=backend,
        niter=niter,
        n_train=len(train),
        init=init,
    )
    labels, distances = model.assign(x)
    model.labels, model.distances = labels, distances
    model.inertia = float(np.square(distances, dtype=np.float64).sum())
    return model


def default_k_grid(n: int) -> list[int]:
    """Candidate ``k`` around ``sqrt(n / 2)`` (×¼ … ×4), within ``[2, n - 1]``."""
    centre = math.sqrt(n / 2)
    grid = {round(centre * f) for f in (0.25, 0.5, 1.0, 2.0, 4.0)}
    return sorted(k for k in grid if 2 <= k <= n - 1) or [min(2, n)]


def choose_k(
    x: np.ndarray,
    candidates: list[int] | None = None,
    *,
    sample_size: int = 10_000,
    seed: int = 0,
    backend: str = "auto",
    niter: int = 20,
) -> tuple[int, dict[int, float]]:
    """The candidate ``k`` with the best silhouette score, and every candidate's score.

    Silhouette is quadratic in the number of points, so each candidate is fitted and scored on one seeded
    random sample of at most ``sample_size`` rows (the same sample for every candidate).
    """
    from sklearn.metrics import silhouette_score

    x = _as_matrix(x, "points")
    n = x.shape[0]
    if n < 3:
        raise InputError(f"Choosing k by silhouette needs at least 3 rows, got {n}.")
    rng = np.random.default_rng(seed)
    sample = x if n <= sample_size else x[np.sort(rng.choice(n, sample_size, replace=False))]
    grid = sorted({int(k) for k in (candidates or default_k_grid(n)) if 2 <= int(k) < len(sample)})
    if not grid:
        raise InputError(
            f"No candidate k in {candidates} fits a sample of {len(sample)} rows (need 2 ≤ k < rows)."
        )
    scores: dict[int, float] = {}
    for k in grid:
        labels = fit_kmeans(sample, k, seed=seed, backend=backend, niter=niter).labels
        assert labels is not None
        scores[k] = float(silhouette_score(sample, labels)) if len(np.unique(labels)) > 1 else -1.0
        logger.info("silhouette k=%d: %.4f", k, scores[k])
    best = max(grid, key=lambda k: (scores[k], -k))
    if len(grid) > 1 and best == grid[-1]:
        logger.warning(
            "The best silhouette is at the largest candidate k=%d; a larger k might score higher. Pass "
            "candidates (k_grid) that extend beyond it, or give k.",
            best,
        )
    return best, scores


# -- backends --------------------------------------------------------------------------------------------
def _as_matrix(x: Any, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"Expected a non-empty 2-D array of {what}, got shape {x.shape}.")
    from hf_dataselect.data import all_finite

    if not all_finite(x):
        raise InputError(f"The {what} contain NaN or infinite values.")
    return x


def initial_centroids(x: np.ndarray, k: int, *, seed: int, init: str = "k-means++") -> np.ndarray:
    """Starting centroids: k-means++ on a seeded sample of ≤ 20·k rows, or ``k`` seeded random rows."""
    rng = np.random.default_rng([seed, 1])
    if init == "random":
        return x[np.sort(rng.choice(len(x), k, replace=False))].copy()
    sample_size = max(k * _KMEANSPP_POINTS_PER_CENTROID, 1000)
    sample = x if len(x) <= sample_size else x[np.sort(rng.choice(len(x), sample_size, replace=False))]
    return _kmeans_plus_plus(sample, k, rng)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur & Vassilvitskii's D² seeding: each next centroid is a row drawn ∝ squared distance to the
    nearest centroid so far. Rows identical to chosen centroids are never drawn again while others remain."""
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(len(x))
    closest = np.full(len(x), np.inf)
    for i in range(k):
        if i:
            cumulative = np.cumsum(closest)
            if cumulative[-1] > 0:
                chosen[i] = min(
                    int(np.searchsorted(cumulative, rng.random() * cumulative[-1], "right")), len(x) - 1
                )
            else:  # fewer distinct rows than k: take the first rows not chosen yet
                chosen[i] = np.setdiff1d(np.arange(len(x)), chosen[:i], assume_unique=False)[0]
        centre = x[chosen[i]]
        sq = np.maximum(sq_norms - 2.0 * (x @ centre) + sq_norms[chosen[i]], 0.0)
        np.minimum(closest, sq, out=closest)
        closest[chosen[i]] = 0.0
    return x[chosen].astype(np.float32, copy=True)


def _faiss_train(x: np.ndarray, start: np.ndarray, *, seed: int, niter: int, verbose: bool) -> np.ndarray:
    import faiss

    k = len(start)
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        verbose=verbose,
        max_points_per_centroid=max(1, -(-x.shape[0] // k)),  # never subsample: the caller already did
        min_points_per_centroid=1,
    )
    kmeans.train(x, init_centroids=np.ascontiguousarray(start, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def _torch_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.empty(len(x), dtype=np.int64)
    distances = np.empty(len(x), dtype=np.float32)
    for start, chunk_labels, chunk_sq in _torch_assign_chunks(x, centroids):
        labels[start : start + len(chunk_labels)] = chunk_labels.numpy()
        distances[start : start + len(chunk_labels)] = chunk_sq.sqrt().numpy()
    return labels, distances


def _torch_assign_chunks(x: np.ndarray, centroids: np.ndarray):
    """Yield ``(start, labels, squared distances)`` per chunk of rows (bounded memory: chunk × k floats)."""
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    c_sq = (c * c).sum(1)
    for start in range(0, len(x), _ASSIGN_CHUNK):
        chunk = torch.from_numpy(x[start : start + _ASSIGN_CHUNK])
        sq = torch.addmm(c_sq, chunk, c.T, alpha=-2).add_((chunk * chunk).sum(1, keepdim=True))
        best_sq, best = sq.min(1)
        yield start, best, best_sq.clamp_min_(0)


def _torch_train(x: np.ndarray, start: np.ndarray, *, niter: int) -> np.ndarray:
    """Lloyd iterations from ``start``; an emptied cluster takes the point farthest from its centroid.

    Sums are accumulated in float64 chunk by chunk, so memory stays at one chunk beyond the data.
    """
    import torch

    k = len(start)
    centroids = np.array(start, dtype=np.float32)
    for _ in range(niter):
        sums = torch.zeros((k, x.shape[1]), dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.int64)
        distances = np.empty(len(x), dtype=np.float32)
        for start, labels, sq in _torch_assign_chunks(x, centroids):
            chunk = torch.from_numpy(x[start : start + len(labels)])
            sums.index_add_(0, labels, chunk.double())
            counts += torch.bincount(labels, minlength=k)
            distances[start : start + len(labels)] = sq.numpy()
        new = (sums / counts.clamp_min(1).unsqueeze(1)).float().numpy()
        empty = np.flatnonzero(counts.numpy() == 0)
        if len(empty):
            farthest = np.argsort(-distances, kind="stable")[: len(empty)]
            new[empty] = x[farthest]
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids
