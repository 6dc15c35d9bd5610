"""SAE-SimScale: similarity-thresholded selection over SAE features (Yang et al. 2025; ALGORITHMS.md §4).

Rows are walked by ``|A_i|`` descending (ties: lower position first); a row is accepted when its similarity to
every row accepted before it is below δ, until the budget is reached. Similarity is Jaccard on active-latent
sets (``J(∅, ∅) = 1``), or cosine on the pooled activation values. δ is given, or found by bisection: the
smallest δ tried (to ``delta_tolerance``) whose pass yields the budget, so the result is exactly the budget.

Stop latents
------------
With ``max_latent_frequency=f`` the latents active in more than a fraction ``f`` of the pool's rows are removed
from every row before any similarity is computed, like stop words in text deduplication: a latent that fires
on most rows says little about which rows are redundant, yet with Zipf-shaped frequencies a few dozen such
latents give every pair of rows a Jaccard of ~0.08 and push the δ that bisection finds down to that noise
floor. The similarity is then Jaccard (or cosine) on the remaining *informative* latents, and everything
below is exact for it (a row left without informative latents is identical to every other such row, as
``J(∅, ∅) = 1``); the walk order still uses the full ``|A_i|``.

Exact pass: prefix filtering
----------------------------
Comparing a row with every accepted row is quadratic. Latents are ordered globally from rare to frequent,
each row is stored sorted in that order, and the *prefix* of a row ``y`` is its first latents:

* Jaccard: ``J(x, y) >= δ`` implies ``|x ∩ y| >= δ|x ∪ y| >= ⌈δ|y|⌉ = o``. At most ``|y| - o`` latents of
  ``y`` are outside ``x``, so ``x`` holds one of the first ``|y| - o + 1`` latents of ``y``.
* cosine (rows L2-normalised): the *suffix* of ``y`` is its longest tail (in the global order) with norm
  below δ. If ``x`` held no latent of the prefix, every common latent would be in the suffix and, by
  Cauchy-Schwarz, ``cos(x, y) <= ‖y_suffix‖ < δ``.

An inverted index holds the prefix latents of the accepted rows. A block of new rows is probed with *all*
its latents in one sparse matrix product (scipy), which yields, for every accepted ``y`` that shares a latent
with it, the shared mass ``s = |x ∩ prefix(y)|`` (for cosine the dot product over those latents). By the
above, no pair at or above δ is missed. The exact similarity is ``s`` plus the overlap of ``x`` with the
suffix of ``y``, which is short for the pairs that matter; most pairs are settled without it by the bounds
``s <= |x ∩ y| <= s + min(|suffix(y)|, |x| - s)`` (cosine: ``<= s + ‖y_suffix‖``). The index is cut into
segments probed one after the other; a row found in conflict is rejected for good, so it skips the later
segments and the pairs inside its block (a rejected row blocks nobody). Pairs among the block's other rows
are found by the same product of those rows with their own prefixes, and their decisions are then made in
walk order. Hence a pass accepts exactly what the quadratic definition accepts (the tests check it against a
brute-force reference on random instances); float margins on the prefix boundaries can only lengthen
prefixes.

The per-row ``max_similarity`` is the largest similarity to an earlier pick *among the candidates* (exact,
or the lower bound ``s`` where the upper bound already settled the pair below δ); earlier picks that were
not candidates are certified below δ, so it equals the true maximum whenever that maximum is ≥ δ and is a
lower bound (still < δ) otherwise.

Cost: the probe touches, per new row, the accepted rows that hold its latents in their prefixes. When δ is
high, prefixes are the rare latents and the pass is near-linear. When δ is low, prefixes are nearly whole
rows and a pass costs about ``rows walked × rows accepted × P(two rows share an informative latent)``
candidate pairs (a rejected row stops at the first index segment that holds a conflict, a constant factor),
which no prefix, size or positional filter removes (nor MinHash-LSH: at such δ its candidates are most pairs
too). The δ that bisection finds for a budget of 10 % of a pool is low, so that regime is the common one;
stop latents shrink ``P`` (benchmarks/results/sae_selectors.md). What keeps that affordable: the product
runs in one pass of scipy's kernel into reused buffers (no symbolic sizing pass), and the pairs whose upper
bound is already below δ (~99 % at such δ) are dropped straight from the product's arrays, with only the
per-row largest lower bound kept for ``max_similarity``, so only ~1 % of the pairs reach the bounds and
suffix lookups.

Threads: a block's rows are scored against the earlier picks independently of each other, so that phase is
split into contiguous parts of about equal work, one per thread (scipy's sparse product and numpy's kernels
release the GIL). Each thread writes only its own rows' verdicts; the decisions inside the block stay
sequential, so the outcome is the same for any number of threads (tested).

Finding δ
---------
Bisection keeps a δ whose full pass fails (yields fewer than the budget) and one whose pass succeeds. With a
sample (``sample_size`` rows drawn with the seed), it first guesses δ from whole passes on the sample and on
half of it (the yield grows less than linearly with the rows walked; the growth measured between the two is
extrapolated to the pool), then gallops on the full pool from that guess with steps ``delta_tolerance,
2·delta_tolerance, ...`` until it brackets the answer, and bisects the bracket. The result is always a full
pass, so the budget and every guarantee above hold exactly whatever the sample says; a good guess only saves
full passes. The δ found may be another point meeting the same criterion (a failing δ at most
``delta_tolerance`` below it) than the sample-free search finds, so the selection can differ slightly.

At δ <= 0 every pair sharing no latent is at or above δ (similarity 0): only the first row is kept, except
with cosine on values that can be negative, where a row with a negative cosine to every kept row is kept too
(a direct walk, as the index cannot help there).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.sae_greedy import coverage_info
from hf_dataselect.selection.sparse_features import DEFAULT_VALUES_COLUMN, SAEFeatureOptions, SparseFeatures

if TYPE_CHECKING:
    import scipy.sparse
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

SIMILARITIES = ("jaccard", "cosine")
_BLOCK = 1024  # rows decided per vectorised block
_TABLE_BYTES = 1 << 27  # the block's dense lookup table (rows × informative latents) stays under 128 MB
_SORT_CHUNK = 1 << 22  # entries re-sorted at a time when the rank-ordered copy of the rows is built
_LOOKUP_ENTRIES = 1 << 20  # suffix lookups per vectorised chunk
_CHUNK_POSTINGS = 1 << 22  # posting-list entries touched per sparse product (bounds the pairs held at once)
_SEGMENT_ENTRIES = 1 << 17  # index entries per segment at most (rows in conflict skip the later segments)
_MARGIN = 1e-9  # float safety margin on prefix boundaries (only ever lengthens prefixes)
_SAMPLE_FROM_ROWS = 50_000  # pools at least this large bracket δ on a sample first (by default)
_ABOVE_ONE = 1.0 + 1e-6  # every similarity is <= 1 (cosine up to rounding) < this δ: every row is accepted
_TAIL_ROWS = 1024  # rows per chunk of the cosine tail norms (bounds their float cancellation error)
_MAX_THREADS = 8  # probe threads at most (by default one per available core)
_PROGRESS_BLOCKS = 64  # blocks between progress lines of a pass (logging level DEBUG)


@dataclass
class SimScalePass:
    """Outcome of one pass at a fixed δ."""

    delta: float
    positions: np.ndarray
    """Accepted rows (pool positions) in acceptance order, at most the budget."""
    max_similarity: np.ndarray
    """Per accepted row: largest similarity to an earlier accepted row among the index's candidates."""
    examined: int
    """Rows walked before the pass stopped (the budget was reached or the pool ended)."""
    candidate_pairs: int = 0
    """Pairs (new row, earlier row) that share a latent of the earlier row's prefix."""
    verified_pairs: int = 0
    """Candidates whose similarity needed the suffix lookup (the bounds did not settle them)."""


@dataclass
class SimScaleOutcome:
    final: SimScalePass
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Every full-pool pass: δ, rows accepted (capped at the budget), rows examined, candidate pairs, seconds."""
    sample_steps: list[dict[str, Any]] = field(default_factory=list)
    """The whole passes on the sample and on half of it that guessed δ (same keys and ``rows``), if any."""


@dataclass
class SimScaleIndex:
    """The δ-independent part of SimScale: walk order, global latent order and rows re-sorted in it."""

    similarity: str
    order: np.ndarray
    """Pool position of each walk row (``|A_i|`` descending, position ascending)."""
    indptr: np.ndarray
    """Walk row ``r`` owns entries ``indptr[r]:indptr[r + 1]`` of ``ranks``."""
    ranks: np.ndarray
    """``int32``: rarity rank of each informative latent (0 = rarest), ascending within each row."""
    num_latents: int
    """Informative latents: every rank is below this."""
    stop_latents: int
    """Latents removed as more frequent than ``max_latent_frequency``."""
    values: np.ndarray | None = None
    """cosine: ``float64`` values aligned with ``ranks``, each row L2-normalised over its informative latents."""
    tail_norms: np.ndarray | None = None
    """cosine: per entry, the squared norm of its row from that entry to the row's end."""
    nonnegative: bool = True
    """cosine: no negative value, so a partial dot product is a lower bound of the whole."""

    @property
    def n(self) -> int:
        return len(self.order)

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Informative latents per walk row (cached: the probe reads it for every chunk of pairs)."""
        return np.diff(self.indptr)

    @classmethod
    def build(
        cls,
        features: SparseFeatures,
        similarity: str = "jaccard",
        max_latent_frequency: float | None = None,
    ) -> SimScaleIndex:
        if similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}.")
        if similarity == "cosine" and features.values is None:
            raise InputError("similarity='cosine' needs the activation values (the sae_values column).")
        check_max_latent_frequency(max_latent_frequency)
        n = features.n_rows
        order = np.lexsort((np.arange(n), -features.sizes))
        frequencies = features.latent_frequencies()
        rank = np.empty(features.num_latents, dtype=np.int64)
        rank[np.lexsort((np.arange(features.num_latents), frequencies))] = np.arange(features.num_latents)
        # stop latents are the most frequent ones, so they hold the highest ranks
        limit = np.inf if max_latent_frequency is None else max_latent_frequency * n
        informative = int(np.count_nonzero(frequencies <= limit))
        sizes = _informative_sizes(features, rank < informative)[order]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=indptr[1:])
        ranks, values = _ranked_rows(
            features, order, rank, indptr, informative, cosine=similarity == "cosine"
        )
        index = cls(similarity, order, indptr, ranks, informative, features.num_latents - informative, values)
        if values is not None:
            index.tail_norms = _tail_norms(values, indptr)
            index.nonnegative = bool(len(values) == 0 or values.min() >= 0)
        return index

    def take(self, walk_rows: np.ndarray) -> SimScaleIndex:
        """The index of a subset of the rows (``walk_rows`` ascending), with the same latent order."""
        positions, _ = _ranges(self.indptr[walk_rows], self.sizes[walk_rows])
        indptr = np.zeros(len(walk_rows) + 1, dtype=np.int64)
        np.cumsum(self.sizes[walk_rows], out=indptr[1:])
        cosine = self.values is not None and self.tail_norms is not None
        return SimScaleIndex(
            self.similarity,
            self.order[walk_rows],
            indptr,
            self.ranks[positions],
            self.num_latents,
            self.stop_latents,
            self.values[positions] if cosine else None,
            self.tail_norms[positions] if cosine else None,
            self.nonnegative,
        )

    def prefix_lengths(self, delta: float) -> np.ndarray:
        """Number of leading (rarest) latents of each row that the index needs at threshold δ."""
        sizes = self.sizes
        if self.similarity == "jaccard":
            overlap = np.maximum(np.ceil(delta * sizes - _MARGIN), 1).astype(np.int64)
            return np.clip(sizes - overlap + 1, 0, sizes)
        assert self.tail_norms is not None
        inside = self.tail_norms >= delta * delta * (1.0 - 1e-6) - 1e-9
        running = np.zeros(len(inside) + 1, dtype=np.int64)
        np.cumsum(inside, out=running[1:])
        return running[self.indptr[1:]] - running[self.indptr[:-1]]

    def similarity_of(self, x: np.ndarray, y: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """Similarity of walk-order row pairs from their shared mass (overlap count or dot product)."""
        if self.similarity == "cosine":
            return shared
        union = self.sizes[x] + self.sizes[y] - shared
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, shared / np.maximum(union, 1), 1.0)

    def leading_matrix(self, rows: np.ndarray, lengths: np.ndarray) -> scipy.sparse.csr_array:
        """The first ``lengths[k]`` latents of each walk row ``rows[k]`` as a sparse matrix over the
        informative latents (ones, or the cosine values)."""
        positions, _ = _ranges(self.indptr[rows], lengths)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return _csr(self.entry_data(positions), self.ranks[positions], indptr, (len(rows), self.num_latents))

    def entry_data(self, positions: np.ndarray) -> np.ndarray:
        if self.values is None:
            return np.ones(len(positions), dtype=np.float32)  # counts stay exact below 2**24
        return self.values[positions]


def check_max_latent_frequency(value: float | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1
    ):
        raise InputError(f"max_latent_frequency must be a fraction in (0, 1] or None, got {value!r}.")


def check_num_threads(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"num_threads must be a positive integer or None, got {value!r}.")


def _informative_sizes(features: SparseFeatures, informative: np.ndarray) -> np.ndarray:
    """Per row (pool order), the number of its latents that are not stop latents."""
    if informative.all():
        return features.sizes
    running = np.zeros(features.n_rows + 1, dtype=np.int64)
    step = max(1, _SORT_CHUNK // max(int(features.sizes.mean()) if features.n_rows else 1, 1))
    for start in range(0, features.n_rows, step):
        stop = min(start + step, features.n_rows)
        flags = informative[features.indices[features.indptr[start] : features.indptr[stop]]]
        inside = np.zeros(len(flags) + 1, dtype=np.int64)
        np.cumsum(flags, out=inside[1:])
        ends = features.indptr[start + 1 : stop + 1] - features.indptr[start]
        running[start + 1 : stop + 1] = running[start] + inside[ends]
    return np.diff(running)


def _ranked_rows(
    features: SparseFeatures,
    order: np.ndarray,
    rank: np.ndarray,
    indptr: np.ndarray,
    informative: int,
    *,
    cosine: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows in walk order, each row's informative latents replaced by their rank and sorted ascending (and,
    for cosine, their values L2-normalised over those latents)."""
    ranks = np.empty(indptr[-1], dtype=np.int32)
    values = np.empty(indptr[-1], dtype=np.float64) if cosine else None
    width = features.num_latents
    full_indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(features.sizes[order], out=full_indptr[1:])
    start = 0
    while start < len(order):
        stop = int(np.searchsorted(full_indptr, full_indptr[start] + _SORT_CHUNK, side="right"))
        stop = min(max(stop - 1, start + 1), len(order))
        positions, segments = features.entry_positions(order[start:stop])
        keys = segments * width + rank[features.indices[positions]]
        if values is not None:
            by_key = np.argsort(keys, kind="stable")
            keys = keys[by_key]
        else:
            keys = np.sort(keys)
        kept = keys % width < informative
        begin, end = indptr[start], indptr[stop]
        ranks[begin:end] = keys[kept] % width
        if values is not None:
            raw = features.values[positions[by_key[kept]]].astype(np.float64)
            norms = np.sqrt(np.bincount(keys[kept] // width, weights=raw * raw, minlength=stop - start))
            values[begin:end] = raw / np.repeat(
                np.where(norms > 0, norms, 1.0), np.diff(indptr[start : stop + 1])
            )
        start = stop
    return ranks, values


def _tail_norms(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per entry, the squared norm of the row from this entry to its end (cosine prefixes).

    A suffix sum over a chunk of rows minus the suffix sum where the row ends: every row has norm 1 (or 0), so
    the sums stay below the chunk's row count and the cancellation error below ~1e-12, well inside the prefix
    margin whatever the pool size."""
    tails = np.empty_like(values)
    sizes = np.diff(indptr)
    for first in range(0, len(sizes), _TAIL_ROWS):
        last = min(first + _TAIL_ROWS, len(sizes))
        begin, end = indptr[first], indptr[last]
        squares = values[begin:end] * values[begin:end]
        running = np.append(np.cumsum(squares[::-1])[::-1], 0.0)
        tails[begin:end] = (
            running[:-1] - running[np.repeat(indptr[first + 1 : last + 1] - begin, sizes[first:last])]
        )
    return tails


# -- one pass ---------------------------------------------------------------------------------------------
def simscale_pass(
    index: SimScaleIndex,
    delta: float,
    budget: int,
    *,
    block: int | None = None,
    num_threads: int | None = None,
) -> SimScalePass:
    """One SimScale walk at threshold ``delta`` that stops once ``budget`` rows are accepted.

    ``num_threads``: rows of a block are probed against the earlier picks in this many threads (``None``: one per
    available core, at most ``_MAX_THREADS``). The rows of a block are independent in that phase and the work
    is numpy and scipy kernels that release the GIL; the decisions stay sequential, so the outcome does not
    depend on the number of threads.
    """
    workers = _probe_threads(num_threads)
    with _probe_executor(workers) as executor:
        return _walk(index, delta, budget, block, executor, workers)


def _walk(
    index: SimScaleIndex,
    delta: float,
    budget: int,
    block: int | None,
    executor: ThreadPoolExecutor | None,
    workers: int,
) -> SimScalePass:
    n = index.n
    if n == 0 or (delta <= 0 and index.nonnegative):  # every pair is at or above δ: only the first row stays
        return SimScalePass(delta, index.order[:1].copy(), np.zeros(min(n, 1)), examined=min(n, 1))
    if delta <= 0:  # cosine with negative values: rows sharing no latent are at 0 >= δ, the index cannot help
        return _nonpositive_delta_pass(index, delta, budget)
    block = block or _block_size(index)
    bounds = _Bounds.at(index, delta)
    accepted = _AcceptedPrefixes(index, bounds)
    table = _BlockTable(index, block)
    picks: list[np.ndarray] = []
    pick_sims: list[np.ndarray] = []
    count = candidates = verified = 0
    empty_taken = False
    progress, began = logger.isEnabledFor(logging.DEBUG), time.perf_counter()
    examined = n
    for start in range(0, n, block):
        stop = min(start + block, n)
        table.fill(start, stop)
        # against the rows accepted before the block, reduced to one verdict per row as the pairs come
        earlier = _Verdicts(stop - start)

        probe = functools.partial(_probe_earlier, accepted, table, bounds, delta, start, stop, earlier)
        parts = _balanced_parts(index.sizes[start:stop], workers)
        for found, checked in executor.map(probe, parts) if executor else map(probe, parts):
            candidates, verified = candidates + found, verified + checked
        # inside the block, among the rows still alive (a rejected row blocks nobody)
        alive = start + np.flatnonzero(~earlier.conflict)
        inner = _similarities(
            index, table, bounds, delta, _block_pairs(index, alive, bounds.prefix), settle=False
        )
        table.clear()
        candidates, verified = candidates + inner.candidates, verified + inner.verified
        chosen, sims, empty_taken = _decide_block(index, start, stop, earlier, inner, delta, empty_taken)
        chosen, sims = chosen[: budget - count], sims[: budget - count]
        picks.append(chosen)
        pick_sims.append(sims)
        count += len(chosen)
        if count == budget:
            examined = int(chosen[-1]) + 1
            break
        accepted.add(chosen)
        if progress and (start // block) % _PROGRESS_BLOCKS == _PROGRESS_BLOCKS - 1:
            logger.debug(
                "SimScale δ=%.4f: %d of %d rows walked, %d accepted, %d candidate pairs, %.1f s.",
                delta,
                stop,
                n,
                count,
                candidates,
                time.perf_counter() - began,
            )
    walk_rows = np.concatenate(picks)
    return SimScalePass(
        delta,
        index.order[walk_rows],
        np.concatenate(pick_sims),
        examined=examined,
        candidate_pairs=candidates,
        verified_pairs=verified,
    )


def _probe_earlier(
    accepted: _AcceptedPrefixes,
    table: _BlockTable,
    bounds: _Bounds,
    delta: float,
    start: int,
    stop: int,
    earlier: _Verdicts,
    part: tuple[int, int],
) -> tuple[int, int]:
    """Score the block rows ``part`` against the rows accepted before the block, into ``earlier``; returns
    the numbers of candidate and verified pairs."""
    candidates = verified = 0
    for pairs in accepted.probe(start, stop, earlier, part):
        scored = _similarities(accepted.index, table, bounds, delta, pairs, settle=True)
        earlier.update(scored, start, delta)
        if pairs.floor is not None:
            earlier.raise_best(pairs.rows - start, pairs.floor)
        candidates, verified = candidates + scored.candidates, verified + scored.verified
    return candidates, verified


def _probe_threads(num_threads: int | None) -> int:
    if num_threads is not None:
        check_num_threads(num_threads)
        return num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, _MAX_THREADS)


@contextlib.contextmanager
def _probe_executor(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    if workers <= 1:
        yield None
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="simscale") as executor:
        yield executor


def _balanced_parts(sizes: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of block rows with about equal numbers of latents (the probe's work)."""
    if parts <= 1 or len(sizes) < 2 * parts:
        return [(0, len(sizes))]
    running = np.cumsum(sizes)
    cuts = np.searchsorted(running, running[-1] * np.arange(1, parts) / parts) + 1
    bounds = [0, *np.unique(np.clip(cuts, 1, len(sizes) - 1)).tolist(), len(sizes)]
    return list(itertools.pairwise(bounds))


def _nonpositive_delta_pass(index: SimScaleIndex, delta: float, budget: int) -> SimScalePass:
    """The walk at δ <= 0 on cosine similarities that can be negative: a row is accepted only when its cosine
    with every accepted row is below δ (so it shares a latent with each of them). Such rows are few, and each
    acceptance costs one product of the rows not yet walked with the accepted ones."""
    rows = np.arange(index.n)
    matrix = index.leading_matrix(rows, index.sizes)
    accepted, sims = [0], [0.0]
    start = 1
    while start < index.n and len(accepted) < budget:
        cosines = (matrix[start:] @ matrix[accepted].T).toarray()  # no shared latent: cosine 0
        best = cosines.max(axis=1)
        fits = np.flatnonzero(best < delta)
        if not len(fits):
            break
        row = start + int(fits[0])
        accepted.append(row)
        sims.append(float(best[fits[0]]))
        start = row + 1
    examined = accepted[-1] + 1 if len(accepted) == budget else index.n
    return SimScalePass(delta, index.order[accepted], np.asarray(sims), examined=examined)


def _block_size(index: SimScaleIndex) -> int:
    bytes_per_slot = 1 if index.values is None else 4
    return int(np.clip(_TABLE_BYTES // max(index.num_latents * bytes_per_slot, 1), 16, _BLOCK))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``starts[k] .. starts[k] + lengths[k] - 1`` for every ``k``, concatenated, and their ``k``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    segments = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    if total == 0:
        return np.zeros(0, dtype=np.int64), segments
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths), segments


def _csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]):
    """A CSR matrix over existing buffers (32-bit indices when they fit, so scipy does not copy them)."""
    import scipy.sparse

    index_dtype = np.int32 if max(len(indices), *shape) < 2**31 - 1 else np.int64
    return scipy.sparse.csr_array(
        (data, indices.astype(index_dtype, copy=False), indptr.astype(index_dtype, copy=False)), shape=shape
    )


class _ProductBuffers(threading.local):
    """Per thread, output buffers of :func:`_sparse_product`, grown as needed and reused: freshly allocated
    buffers of this size cost a page fault per 4 KiB written, which made the one-pass product no faster."""

    def __init__(self) -> None:
        self.indices = np.empty(0, dtype=np.int32)
        self.data: dict[np.dtype, np.ndarray] = {}

    def get(self, size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if len(self.indices) < size:
            self.indices = np.empty(size, dtype=np.int32)
        if dtype not in self.data or len(self.data[dtype]) < size:
            self.data[dtype] = np.empty(size, dtype=dtype)
        return self.indices[:size], self.data[dtype][:size]


def _sparse_product(left, right, max_nonzeros: int, buffers: _ProductBuffers):
    """``left @ right`` (CSR, 32-bit indices) given a bound on its non-zeros, in one pass of scipy's kernel.

    scipy's ``@`` first runs a symbolic pass (``csr_matmat_maxnnz``) over the same entries only to size the
    output, about 45 % of the product's time here. The probe knows a bound (rows × columns, or the postings it
    touches), so the product is written straight into reused buffers of that size. The result is a view of
    them: valid until the next product of the same thread. Falls back to ``@`` when the kernel is not
    available or the indices are 64-bit."""
    import scipy.sparse

    matmat = getattr(getattr(scipy.sparse, "_sparsetools", None), "csr_matmat", None)
    index_arrays = (left.indptr, left.indices, right.indptr, right.indices)
    if matmat is None or max_nonzeros >= 2**31 - 1 or any(a.dtype != np.int32 for a in index_arrays):
        return (left @ right).tocsr()
    rows, columns = left.shape[0], right.shape[1]
    indptr = np.empty(rows + 1, dtype=np.int32)
    indices, data = buffers.get(max_nonzeros, np.result_type(left.data, right.data))
    try:
        matmat(
            rows, columns, *index_arrays[:2], left.data, *index_arrays[2:], right.data, indptr, indices, data
        )
    except TypeError:  # a private kernel whose signature changed: scipy checks arguments before writing
        return (left @ right).tocsr()
    nonzeros = int(indptr[-1])
    return scipy.sparse.csr_array((data[:nonzeros], indices[:nonzeros], indptr), shape=(rows, columns))


@dataclass
class _Candidates:
    """Pairs (new row ``x``, earlier row ``y``; walk rows) with ``shared`` = mass of ``x`` on ``prefix(y)``."""

    x: np.ndarray
    y: np.ndarray
    shared: np.ndarray
    found: int = -1
    """Pairs the product yielded: ``len(x)``, unless the pairs that cannot reach δ were dropped."""
    rows: np.ndarray | None = None
    floor: np.ndarray | None = None
    """With dropped pairs: per query row ``rows[i]``, the largest lower bound of its similarity over all the
    pairs the product yielded for it (so ``max_similarity`` does not depend on the drop)."""

    def __post_init__(self) -> None:
        if self.found < 0:
            self.found = len(self.x)

    @classmethod
    def from_product(cls, product, x_rows: np.ndarray, y_rows: np.ndarray) -> _Candidates:
        """From ``product[i, j]`` = shared mass of query row ``x_rows[i]`` on the prefix of ``y_rows[j]``."""
        x = np.repeat(x_rows, np.diff(product.indptr))
        return cls(x, y_rows[product.indices], product.data.astype(np.float64))

    @classmethod
    def reachable(
        cls, product, x_rows: np.ndarray, y_rows: np.ndarray, bounds: _Bounds, columns: _SegmentBounds
    ) -> _Candidates:
        """:meth:`from_product` without the pairs whose upper bound is below δ (``bounds.reach``): at low δ
        they are ~99 % of the product, and every later step would touch them only to discard them."""
        counts = np.diff(product.indptr)
        shared = product.data
        kept = np.flatnonzero(
            shared + columns.reach[product.indices] >= np.repeat(bounds.need[x_rows], counts)
        )
        x = x_rows[np.searchsorted(product.indptr, kept, side="right") - 1]
        if bounds.jaccard:  # the same float64 arithmetic as the lower bound in _similarities
            lower = shared / (
                np.repeat(bounds.sizes[x_rows], counts) + columns.sizes[product.indices] - shared
            )
        else:
            lower = shared.astype(np.float64)
        floor = np.zeros(len(x_rows), dtype=np.float64)
        starts = product.indptr[:-1][counts > 0]
        if len(starts):
            floor[counts > 0] = np.maximum.reduceat(lower, starts)
        return cls(
            x,
            y_rows[product.indices[kept]],
            shared[kept].astype(np.float64),
            found=len(shared),
            rows=x_rows,
            floor=floor,
        )


class _SegmentBounds(NamedTuple):
    """Per column of an index segment (an accepted row): its ``_Bounds.reach`` and its size."""

    reach: np.ndarray
    sizes: np.ndarray


class _Segment(NamedTuple):
    """Index entries sorted by latent rank: ``(rank, column, data)``; column ``c`` is walk row ``rows[c]``."""

    ranks: np.ndarray
    cols: np.ndarray
    data: np.ndarray
    rows: np.ndarray
    postings: np.ndarray | None = None
    """Entries per latent rank (set once the segment is final)."""

    def merge(self, newer: _Segment) -> _Segment:
        ranks = np.concatenate([self.ranks, newer.ranks])
        order = np.argsort(ranks, kind="stable")  # two sorted runs: a linear merge
        cols = np.concatenate([self.cols, newer.cols + len(self.rows)])
        data = np.concatenate([self.data, newer.data])
        return _Segment(ranks[order], cols[order], data[order], np.concatenate([self.rows, newer.rows]))


class _AcceptedPrefixes:
    """Inverted index latent → accepted rows over their prefix latents: latent-major sparse segments (rows =
    latents, columns = the segment's accepted rows) of at most ``_SEGMENT_ENTRIES`` entries, merged like a
    log-structured merge tree."""

    def __init__(self, index: SimScaleIndex, bounds: _Bounds) -> None:
        self.index = index
        self.bounds = bounds
        self.prefix = bounds.prefix
        self.segments: list[_Segment] = []
        self.matrices: list[Any] = []
        self.columns: list[_SegmentBounds] = []
        self.buffers = _ProductBuffers()

    def add(self, rows: np.ndarray) -> None:
        """Index the prefixes of newly accepted walk rows."""
        positions, local = _ranges(self.index.indptr[rows], self.prefix[rows])
        if not len(positions):
            return
        ranks = self.index.ranks[positions]
        order = np.argsort(ranks, kind="stable")
        cols = local[order].astype(np.int32)
        segment = _Segment(ranks[order], cols, self.index.entry_data(positions)[order], rows)
        while (
            self.segments
            and len(segment.ranks) * 2 >= len(self.segments[-1].ranks)
            and len(segment.ranks) + len(self.segments[-1].ranks) <= _SEGMENT_ENTRIES
        ):
            self.matrices.pop()
            self.columns.pop()
            segment = self.segments.pop().merge(segment)
        postings = np.bincount(segment.ranks, minlength=self.index.num_latents)
        segment = segment._replace(postings=postings)
        self.segments.append(segment)
        indptr = np.zeros(self.index.num_latents + 1, dtype=np.int64)
        np.cumsum(postings, out=indptr[1:])
        self.matrices.append(_csr(segment.data, segment.cols, indptr, (len(indptr) - 1, len(segment.rows))))
        self.columns.append(_SegmentBounds(self.bounds.reach[segment.rows], self.bounds.sizes[segment.rows]))

    def probe(
        self, start: int, stop: int, earlier: _Verdicts, part: tuple[int, int] | None = None
    ) -> Iterator[_Candidates]:
        """Accepted rows ``y`` sharing a latent of their prefix with walk rows ``start:stop`` (of those, the
        block rows ``part``), and the shared mass. Segment by segment, oldest first, so that a row found in
        conflict (``earlier.conflict``, updated by the caller between chunks) is not probed against the later
        segments; within a segment, in one product when the rows and the segment's columns make at most
        ``_CHUNK_POSTINGS`` pairs, else in chunks of whole rows that touch at most about that many postings
        (either bounds the pairs held at once)."""
        index = self.index
        first_row, end_row = part or (0, stop - start)
        query_rows: np.ndarray | None = None
        query = None
        for matrix, segment, columns in zip(self.matrices, self.segments, self.columns, strict=True):
            rows = start + first_row + np.flatnonzero(~earlier.conflict[first_row:end_row])
            if not len(rows):
                return
            if len(rows) * len(segment.rows) <= _CHUNK_POSTINGS:
                if query_rows is None or not np.array_equal(rows, query_rows):  # rebuilt only when rows died
                    query_rows, query = rows, index.leading_matrix(rows, index.sizes[rows])
                product = _sparse_product(query, matrix, len(rows) * len(segment.rows), self.buffers)
                yield self._candidates(product, rows, segment.rows, columns)
                continue
            sizes = index.sizes[rows]
            positions, _ = _ranges(index.indptr[rows], sizes)
            work = np.zeros(len(positions) + 1, dtype=np.int64)  # postings touched, per row boundary
            np.cumsum(segment.postings[index.ranks[positions]], out=work[1:])
            work = work[np.r_[0, np.cumsum(sizes)]]
            first = 0
            while first < len(rows):
                last = int(np.searchsorted(work, work[first] + _CHUNK_POSTINGS, side="right")) - 1
                last = min(max(last, first + 1), len(rows))
                chunk = index.leading_matrix(rows[first:last], sizes[first:last])
                pairs = min(int(work[last] - work[first]), (last - first) * len(segment.rows))
                product = _sparse_product(chunk, matrix, pairs, self.buffers)
                yield self._candidates(product, rows[first:last], segment.rows, columns)
                first = last

    def _candidates(
        self, product, x_rows: np.ndarray, y_rows: np.ndarray, columns: _SegmentBounds
    ) -> _Candidates:
        if self.bounds.filtering:
            return _Candidates.reachable(product, x_rows, y_rows, self.bounds, columns)
        return _Candidates.from_product(product, x_rows, y_rows)


def _block_pairs(index: SimScaleIndex, rows: np.ndarray, prefix: np.ndarray) -> _Candidates:
    """Pairs of walk ``rows`` of one block (later row ``x``, earlier row ``y``) sharing a latent of
    ``prefix(y)``, by one sparse product of the rows with their own prefixes."""
    product = index.leading_matrix(rows, index.sizes[rows]) @ index.leading_matrix(rows, prefix[rows]).T
    pairs = _Candidates.from_product(product.tocsr(), rows, rows)
    keep = pairs.y < pairs.x
    return _Candidates(pairs.x[keep], pairs.y[keep], pairs.shared[keep])


class _BlockTable:
    """Dense table ``(row - start, latent rank) -> present`` (Jaccard) or ``-> entry + 1`` (cosine) for the
    rows of the current block, so a suffix lookup is one gather instead of a search."""

    def __init__(self, index: SimScaleIndex, block: int) -> None:
        self.index = index
        dtype = bool if index.values is None else np.int32
        self.table = np.zeros(block * max(index.num_latents, 1), dtype=dtype)
        self.keys = np.zeros(0, dtype=np.int64)
        self.start = self.begin = 0

    def fill(self, start: int, stop: int) -> None:
        index = self.index
        begin, end = index.indptr[start], index.indptr[stop]
        segments = np.repeat(np.arange(stop - start, dtype=np.int64), index.sizes[start:stop])
        self.keys = segments * index.num_latents + index.ranks[begin:end]
        self.start, self.begin = start, begin
        self.table[self.keys] = True if self.table.dtype == bool else np.arange(1, end - begin + 1)

    def clear(self) -> None:
        self.table[self.keys] = 0

    def suffix_mass(self, x: np.ndarray, y: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Overlap count (or dot product) of block rows ``x`` with the suffixes of rows ``y``."""
        index = self.index
        mass = np.zeros(len(x), dtype=np.float64)
        lengths = index.sizes[y] - prefix[y]
        step = max(1, _LOOKUP_ENTRIES // max(int(lengths.max()) if len(lengths) else 1, 1))
        for begin in range(0, len(x), step):
            part = slice(begin, begin + step)
            positions, pair = _ranges(index.indptr[y[part]] + prefix[y[part]], lengths[part])
            slots = self.table[(x[part] - self.start)[pair] * index.num_latents + index.ranks[positions]]
            if index.values is None:
                mass[part] = np.bincount(pair[slots], minlength=len(x[part]))
            else:
                match = slots > 0
                products = index.values[positions[match]] * index.values[slots[match] - 1 + self.begin]
                mass[part] = np.bincount(pair[match], weights=products, minlength=len(x[part]))
        return mass


@dataclass
class _Pairs:
    x: np.ndarray
    y: np.ndarray
    sim: np.ndarray
    candidates: int = 0
    verified: int = 0


@dataclass
class _Bounds:
    """Per walk row at one δ: prefix length and what its suffix can add to a shared mass (as floats)."""

    prefix: np.ndarray
    sizes: np.ndarray
    suffix: np.ndarray
    """Jaccard: suffix length; cosine: suffix norm."""
    reach: np.ndarray
    need: np.ndarray
    """``float32`` pair filter: a pair ``(x, y)`` with shared prefix mass ``s`` can reach δ only if
    ``s + reach[y] >= need[x]``. Jaccard: the upper bound of :func:`_similarities` is at least δ only if
    ``s + |suffix(y)| >= δ/(1+δ) (|x| + |y|)``; cosine on non-negative values: only if ``s + ‖suffix(y)‖ >= δ``.
    ``reach`` includes a margin far above float32 rounding, so the filter can only keep extra pairs."""
    jaccard: bool
    filtering: bool
    """Whether the filter applies (not for cosine with negative values: there every candidate is exact)."""

    @classmethod
    def at(cls, index: SimScaleIndex, delta: float) -> _Bounds:
        prefix = index.prefix_lengths(delta)
        sizes = index.sizes.astype(np.float64)
        jaccard = index.tail_norms is None
        if jaccard:
            suffix = sizes - prefix
            share = delta / (1 + delta)
            reach, need = suffix - share * sizes, share * sizes
        else:
            boundary = np.minimum(index.indptr[:-1] + prefix, max(len(index.ranks) - 1, 0))
            tail = np.where(prefix < sizes, index.tail_norms[boundary] if len(index.ranks) else 0.0, 0.0)
            suffix = np.sqrt(np.maximum(tail, 0.0))
            reach, need = suffix, np.full(len(sizes), delta)
        margin = 1e-3 * (1.0 + (float(sizes.max()) if len(sizes) else 0.0) * 1e-3)
        return cls(
            prefix,
            sizes,
            suffix,
            (reach + margin).astype(np.float32),
            need.astype(np.float32),
            jaccard,
            jaccard or index.nonnegative,
        )


def _similarities(
    index: SimScaleIndex,
    table: _BlockTable,
    bounds: _Bounds,
    delta: float,
    pairs: _Candidates,
    *,
    settle: bool,
) -> _Pairs:
    """Similarity of candidate pairs: exact where the bounds do not already place it below δ (where they
    do, the lower bound), and exact or a certain lower bound ≥ δ for the conflicts.

    With ``settle`` (every ``y`` is accepted), the rows with a certain conflict need no suffix lookups.
    """
    x, y, shared = pairs.x, pairs.y, pairs.shared
    if not len(x):
        return _Pairs(x, y, shared, candidates=pairs.found)
    if index.values is None:  # candidates share a latent, so every union below is at least 1
        size_x = bounds.sizes[x]
        total = size_x + bounds.sizes[y]
        rest = np.minimum(bounds.suffix[y], size_x - shared)
        lower = shared / (total - shared)
        upper = (shared + rest) / (total - shared - rest)
    elif index.nonnegative:
        lower, upper = shared, shared + bounds.suffix[y] + 1e-9
    else:  # a partial dot product bounds nothing from below: compute every candidate exactly
        lower, upper = np.full(len(x), -np.inf), np.full(len(x), np.inf)
    certain = lower >= delta
    todo = ~certain & (upper >= delta)
    if settle and certain.any():
        first = int(x.min())
        settled = np.zeros(int(x.max()) - first + 1, dtype=bool)
        settled[x[certain] - first] = True
        todo &= ~settled[x - first]
    sim = np.where(np.isfinite(lower), lower, 0.0)
    picks = np.flatnonzero(todo)
    sim[picks] = index.similarity_of(
        x[picks], y[picks], shared[picks] + table.suffix_mass(x[picks], y[picks], bounds.prefix)
    )
    return _Pairs(x, y, sim, candidates=pairs.found, verified=len(picks))


class _Verdicts:
    """Per block row: whether it conflicts with an earlier accepted row, and the largest similarity seen."""

    def __init__(self, rows: int) -> None:
        self.conflict = np.zeros(rows, dtype=bool)
        self.best = np.zeros(rows, dtype=np.float64)

    def update(self, scored: _Pairs, start: int, delta: float) -> None:
        """Record scored pairs whose ``x`` are grouped (equal ``x`` adjacent, as the probe yields them); only
        the rows of those ``x`` are written, so parts of a block can be updated from different threads."""
        if not len(scored.x):
            return
        local = scored.x - start
        self.conflict[local[scored.sim >= delta]] = True
        heads = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
        rows = local[heads]
        self.best[rows] = np.maximum(self.best[rows], np.maximum.reduceat(scored.sim, heads))

    def raise_best(self, rows: np.ndarray, floor: np.ndarray) -> None:
        self.best[rows] = np.maximum(self.best[rows], floor)


def _decide_block(
    index: SimScaleIndex,
    start: int,
    stop: int,
    earlier: _Verdicts,
    inner: _Pairs,
    delta: float,
    empty_taken: bool,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Walk rows of the block that are accepted (in order, before the budget cap) and their max similarity."""
    alive = ~earlier.conflict
    # J(∅, ∅) = 1: a row without informative latents conflicts with every other such row
    empty = np.flatnonzero(index.sizes[start:stop] == 0)
    if delta <= 1.0 and len(empty):
        alive[empty[0 if empty_taken else 1 :]] = False
    # conflicts inside the block, in walk order: a row dies if an earlier row that lives conflicts with it
    conflict = inner.sim >= delta
    cx, cy = inner.x[conflict] - start, inner.y[conflict] - start
    order = np.argsort(cx, kind="stable")
    cx, cy = cx[order], cy[order]
    bounds = np.flatnonzero(np.r_[True, cx[1:] != cx[:-1], True]) if len(cx) else np.zeros(1, dtype=np.int64)
    for first, last in itertools.pairwise(bounds):
        row = cx[first]
        if alive[row] and alive[cy[first:last]].any():
            alive[row] = False
    best = earlier.best.copy()
    partner_alive = alive[inner.y - start]
    np.maximum.at(best, inner.x[partner_alive] - start, inner.sim[partner_alive])
    if delta > 1.0 and len(empty):  # every empty row is kept; the later ones are identical to the first
        best[empty[0 if empty_taken else 1 :]] = 1.0
    chosen = np.flatnonzero(alive)
    return chosen + start, best[chosen], empty_taken or bool(alive[empty].any())


# -- finding δ ---------------------------------------------------------------------------------------------
def simscale(
    features: SparseFeatures,
    budget: int,
    *,
    delta: float | None = None,
    similarity: str = "jaccard",
    delta_tolerance: float = 5e-3,
    max_steps: int = 40,
    max_latent_frequency: float | None = None,
    sample_size: int | None = None,
    seed: int = 0,
    index: SimScaleIndex | None = None,
    num_threads: int | None = None,
) -> SimScaleOutcome:
    """SimScale selection of exactly ``budget`` rows, with δ given or found by bisection.

    ``sample_size``: rows of the seeded sample on which δ is first guessed (``None`` or below 2: no sample).
    ``num_threads``: threads of each pass (see :func:`simscale_pass`).
    """
    n = features.n_rows
    if not 1 <= budget <= n:
        raise InputError(f"budget must be between 1 and the pool size ({n}), got {budget}.")
    index = index or SimScaleIndex.build(features, similarity, max_latent_frequency)
    full = _Search(index, budget, num_threads)
    if delta is not None:
        outcome = full.run(float(delta))
        if len(outcome.positions) < budget:
            raise InputError(
                f"With δ={delta} SimScale accepts only {len(outcome.positions)} of the {budget} rows asked for; "
                "raise delta, lower the budget, or leave delta unset to find it automatically."
            )
        return SimScaleOutcome(outcome, full.steps)
    guess, sample_steps = None, []
    if sample_size is not None and budget > 1 and 2 <= sample_size < n:
        guess, sample_steps = _sample_guess(
            index, budget, sample_size, seed, delta_tolerance, max_steps, num_threads
        )
    final = full.bisect(0.0, _ABOVE_ONE, delta_tolerance, max_steps, guess=guess)
    return SimScaleOutcome(final, full.steps, sample_steps)


def _sample_guess(
    index: SimScaleIndex,
    budget: int,
    sample_size: int,
    seed: int,
    tolerance: float,
    max_steps: int,
    num_threads: int | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """A δ whose full pass should yield about the budget, from whole passes on a seeded sample and on half
    of it.

    The yield of a pass grows less than linearly with the rows walked (a larger pool holds more rows similar
    to those already kept), so the sample's yield is extrapolated with the growth exponent measured between
    the half sample and the sample: ``yield(n) ≈ yield(s) · (n / s)^α``, α = log2(yield(s) / yield(s/2)) in
    [0, 1]. The δ whose extrapolated yield reaches the budget is bisected to ``tolerance``. Passes stop at
    ``budget · (s / n)^½`` rows kept (enough if α >= ½), which bounds their cost. Only speed depends on this
    guess: the full-pool search corrects it.
    """
    rng = np.random.default_rng([seed, 0x5135])
    sample = index.take(np.sort(rng.choice(index.n, size=sample_size, replace=False)))
    half = sample.take(np.sort(rng.choice(sample_size, size=sample_size // 2, replace=False)))
    growth = math.log(index.n / sample_size)
    # a pass costs ~ rows walked × rows kept: stop the sample passes at the yield that, with α >= 1/2, already
    # reaches the budget (such a δ counts as high enough)
    cap = max(2, min(sample.n, math.ceil(budget * math.exp(-growth / 2))))
    whole, halves = _Search(sample, cap, num_threads), _Search(half, cap, num_threads)
    low, high = 0.0, _ABOVE_ONE
    while high - low > tolerance * (1 + 1e-9) and len(whole.steps) < max_steps:
        middle = (low + high) / 2
        kept = len(whole.run(middle).positions)
        if kept < cap:
            kept_half = len(halves.run(middle).positions)
            alpha = min(max(math.log(kept / kept_half) / math.log(sample.n / half.n), 0.0), 1.0)
        if kept >= cap or math.log(kept) + alpha * growth >= math.log(budget):
            high = middle
        else:
            low = middle
    steps = [{**step, "rows": sample.n} for step in whole.steps] + [
        {**step, "rows": half.n} for step in halves.steps
    ]
    return high, steps


def default_sample_size(n: int) -> int | None:
    """Rows of the sample that brackets δ before the full-pool passes: none below ``_SAMPLE_FROM_ROWS`` rows
    (full passes are cheap there), else 1/16 of the pool. A pass costs about rows walked × rows accepted, so a
    whole-sample pass costs 1/256 to 1/16 of a full one (the sample keeps a larger share of its rows)."""
    return None if n < _SAMPLE_FROM_ROWS else n // 16


class _Search:
    """Passes at chosen δ on one index with one budget, each recorded in ``steps``."""

    def __init__(self, index: SimScaleIndex, budget: int, num_threads: int | None = None) -> None:
        self.index = index
        self.budget = budget
        self.num_threads = num_threads
        self.steps: list[dict[str, Any]] = []

    def run(self, delta: float) -> SimScalePass:
        started = time.perf_counter()
        outcome = simscale_pass(self.index, delta, self.budget, num_threads=self.num_threads)
        self.steps.append(
            {
                "delta": delta,
                "accepted": len(outcome.positions),
                "examined": outcome.examined,
                "candidate_pairs": outcome.candidate_pairs,
                "verified_pairs": outcome.verified_pairs,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        logger.info(
            "SimScale δ=%.4f on %d rows: %d accepted after %d examined.",
            delta,
            self.index.n,
            len(outcome.positions),
            outcome.examined,
        )
        return outcome

    def bisect(
        self, low: float, high: float, tolerance: float, max_steps: int, *, guess: float | None = None
    ) -> SimScalePass:
        """The pass at the smallest δ found (to ``tolerance``) that yields the budget.

        Invariant: the pass at ``low`` yields fewer rows than the budget (at δ = 0 only one row survives) and
        the pass at ``high`` yields the budget (above 1, every row is accepted).
        """
        if self.budget == 1:
            return self.run(0.0)
        best: SimScalePass | None = None
        if guess is not None and low < guess < high:
            low, high, best = self._gallop(low, high, guess, tolerance, max_steps)
        while high - low > tolerance * (1 + 1e-9) and len(self.steps) < max_steps:
            middle = (low + high) / 2
            outcome = self.run(middle)
            if len(outcome.positions) >= self.budget:
                high, best = middle, outcome
            else:
                low = middle
        return best if best is not None else self.run(high)

    def _gallop(
        self, low: float, high: float, guess: float, tolerance: float, max_steps: int
    ) -> tuple[float, float, SimScalePass | None]:
        """Narrow ``(low, high)`` around ``guess``: a pass there, then passes ``tolerance``, ``2·tolerance``, ...
        further in the direction it points to, until the outcome flips (or a bound is reached)."""
        best = None
        outcome = self.run(guess)
        going_down = len(outcome.positions) >= self.budget
        if going_down:
            high, best = guess, outcome
        else:
            low = guess
        step = tolerance
        while len(self.steps) < max_steps:
            point = high - step if going_down else low + step
            if not low < point < high:
                break
            outcome = self.run(point)
            if len(outcome.positions) >= self.budget:
                high, best = point, outcome
            else:
                low = point
            if (len(outcome.positions) >= self.budget) != going_down:
                break
            step *= 2
        return low, high, best


# -- the selector ---------------------------------------------------------------------------------------------
@register_selector("sae-simscale")
@dataclass
class SAESimScaleSelector(SAEFeatureOptions, Selector):
    """SAE-SimScale: walk rows by number of active latents, keep those below δ similarity to every kept row.

    Per selected row: ``max_similarity`` (to earlier picks; see the module docstring) and ``n_active``.
    ``info``: ``delta``, how it was found, the bisection passes, and the coverage curves.
    """

    delta: float | None = None
    """Similarity threshold: a row is kept when its similarity to every kept row is below it (δ > 1 keeps
    every row). ``None``: found by bisection, the smallest δ tried (to ``delta_tolerance``) whose pass yields
    the budget. A given δ whose pass yields fewer rows than the budget is an error."""
    similarity: str = "jaccard"
    """``jaccard`` on active-latent sets, or ``cosine`` on the pooled activation values."""
    values_column: str = DEFAULT_VALUES_COLUMN
    """Column of pooled activation values (used by ``similarity="cosine"``)."""
    delta_tolerance: float = 5e-3
    """Bisection stops when the bracket around δ is this narrow."""
    max_latent_frequency: float | None = None
    """Stop latents, a fraction in (0, 1]. ``None`` (default): the similarity is on the full active-latent
    sets, exactly as ALGORITHMS.md §4. Set (e.g. 0.01): the latents active in more than this fraction of the pool's
    rows are dropped from every row first, and the similarity, hence δ and the selection, is that of the
    remaining informative latents (exact for it; the walk order keeps the full counts). Much faster when the δ
    found is low; a different, not an approximate, selection (benchmarks/results/sae_selectors.md)."""
    delta_sample_size: int | None = None
    """Only when δ is not given: rows of a seeded random sample (and half of it) on which δ is guessed first,
    to save full passes. ``None``: 1/16 of pools of 50,000 rows or more, no sample below; ``0``: never. The
    result is always a full-pool pass with the exact budget; the δ found can differ by about
    ``delta_tolerance`` from the one found without a sample (another δ meeting the same criterion), so the
    rows can differ slightly."""
    random_reference: bool = True
    """Also record the coverage curve of a random subset of the same size (for the report)."""
    num_threads: int | None = None
    """Threads that score a block of rows against the earlier picks (``None``: one per available core, at most
    8). The selection does not depend on it."""

    def _extra_columns(self) -> tuple[str, ...]:
        return (self.values_column,) if self.similarity == "cosine" else ()

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if self.similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {list(SIMILARITIES)}, got {self.similarity!r}.")
        if self.delta is not None and (
            isinstance(self.delta, bool)
            or not isinstance(self.delta, int | float)
            or not math.isfinite(self.delta)
        ):
            raise InputError(f"delta must be a number (similarity threshold), got {self.delta!r}.")
        if not (isinstance(self.delta_tolerance, int | float) and 0 < self.delta_tolerance < 1):
            raise InputError(f"delta_tolerance must be in (0, 1), got {self.delta_tolerance!r}.")
        check_max_latent_frequency(self.max_latent_frequency)
        check_num_threads(self.num_threads)
        if self.delta_sample_size is not None and (
            isinstance(self.delta_sample_size, bool)
            or not isinstance(self.delta_sample_size, int)
            or self.delta_sample_size < 0
        ):
            raise InputError(
                f"delta_sample_size must be a number of rows (0: no sample) or None, got {self.delta_sample_size!r}."
            )
        has_values = self.values_column in dataset.column_names
        if self.similarity == "cosine" and has_values and self.features_column not in dataset.column_names:
            raise InputError(f"Column {self.values_column!r} is present but {self.features_column!r} is not.")
        self.validate_sae_options(dataset, context, *self._extra_columns())

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        return self.ensure_sae_features(dataset, context, *self._extra_columns())

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        values_column = self.values_column if self.similarity == "cosine" else None
        features = self.read_features(dataset, values_column)
        sample_size = (
            default_sample_size(features.n_rows) if self.delta_sample_size is None else self.delta_sample_size
        )
        index = SimScaleIndex.build(features, self.similarity, self.max_latent_frequency)
        outcome = simscale(
            features,
            budget,
            delta=self.delta,
            delta_tolerance=self.delta_tolerance,
            sample_size=sample_size if sample_size and sample_size < features.n_rows else None,
            seed=context.seed,
            index=index,
            num_threads=self.num_threads,
        )
        final = outcome.final
        positions = final.positions[:budget]
        info = coverage_info(features, positions, context, random_reference=self.random_reference)
        info.update(
            delta=final.delta,
            delta_found_by="given" if self.delta is not None else "bisection",
            similarity=self.similarity,
            max_latent_frequency=self.max_latent_frequency,
            stop_latents=index.stop_latents,
            delta_sample_size=sample_size if outcome.sample_steps else 0,
            bisection_steps=len(outcome.steps) if self.delta is None else 0,
            passes=outcome.steps,
            sample_passes=outcome.sample_steps,
            rows_examined=final.examined,
        )
        scores = {
            "max_similarity": final.max_similarity[:budget],
            "n_active": features.sizes[positions],
        }
        return SelectionOutput(positions=positions, scores=scores, info=info)
