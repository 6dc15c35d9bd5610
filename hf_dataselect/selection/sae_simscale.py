"""SAE-SimScale: similarity-thresholded selection over SAE features (Yang et al. 2025; ALGORITHMS.md §4).

Rows are walked by ``|A_i|`` descending (ties: lower position first); a row is accepted when its similarity to
every row accepted before it is below δ, until the budget is reached. Similarity is Jaccard on active-latent
sets (``J(∅, ∅) = 1``), or cosine on the pooled activation values. δ is given, or found by bisection: the
smallest δ tried (to ``delta_tolerance``) whose pass yields the budget, so the result is exactly the budget.

Exact and near-linear: prefix filtering
---------------------------------------
Comparing a row with every accepted row is quadratic. Instead latents are ordered globally from rare to
frequent and each row keeps only a *prefix* of its latents in that order; an inverted index maps latent →
accepted rows through those prefixes only, and a new row is compared exactly with the accepted rows that share
a prefix latent with it. The prefix is long enough that no pair at or above δ can be missed:

* Jaccard: ``J(x, y) >= δ`` implies ``|x ∩ y| >= ⌈δ|x|⌉ = o``. Of the ``|x|`` latents of ``x`` at most ``|x| - o``
  are outside ``y``, so the first common latent ``a`` (in the global order) is among the first ``|x| - o + 1``
  latents of ``x``; the same holds for ``y``. Prefix length ``|x| - ⌈δ|x|⌉ + 1``: the most frequent ~δ|x|
  latents, whose posting lists would be the long ones, are never indexed.
* cosine (rows L2-normalised): the suffix of ``x`` is its longest tail (in the global order) with norm below
  δ. If the first common latent ``a`` were in the suffix of ``x``, every common latent would be, and by
  Cauchy-Schwarz ``cos(x, y) <= ‖x_suffix‖ < δ``. So ``a`` is in both prefixes.

Candidates are then filtered before the exact comparison: a pair whose shared prefix latents already reach δ
is a certain conflict, and a pair is certainly below δ when even its shared prefix latents plus every latent
after the last shared one (in both rows) cannot reach δ (the positional filter of PPJoin). Hence the pass
accepts exactly what the quadratic definition accepts (the tests check it against a
brute-force reference on random instances), with safety margins on the float boundary that can only lengthen
prefixes. The cost is the number of candidate pairs: small when δ is high or rows share few rare latents,
growing towards quadratic as δ falls (a low δ makes prefixes nearly whole rows) and when latent frequencies
have a heavy (Zipf) tail, where any two rows share a few moderately rare latents. The per-row
``max_similarity`` is the largest similarity to an earlier pick *among the candidates*; earlier picks that
were not candidates are certified below δ, so it equals the true maximum whenever that maximum is ≥ δ and is
a lower bound (still < δ) otherwise.

Rows are processed in blocks: a block is probed against the index in one vectorised step, pairs inside the
block are found by a self-join of its prefixes, and the accept/reject decisions inside the block are then made
in order. The index is a few sorted segments merged like a log-structured merge tree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.sae_greedy import coverage_info
from hf_dataselect.selection.sparse_features import DEFAULT_VALUES_COLUMN, SAEFeatureOptions, SparseFeatures

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

SIMILARITIES = ("jaccard", "cosine")
_BLOCK = 1024  # rows decided per vectorised block
_SORT_CHUNK = 1 << 22  # entries re-sorted at a time when the rank-ordered copy of the rows is built
_VERIFY_ENTRIES = 1 << 18  # latent lookups per vectorised verification chunk
_MARGIN = 1e-9  # float safety margin on prefix boundaries (only ever lengthens prefixes)


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
    verified_pairs: int = 0


@dataclass
class SimScaleOutcome:
    final: SimScalePass
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Every pass: δ, rows accepted (capped at the budget), rows examined, candidate pairs."""


class SimScaleIndex:
    """The δ-independent part of SimScale: walk order, global latent order and rows re-sorted in it."""

    def __init__(self, features: SparseFeatures, similarity: str = "jaccard") -> None:
        if similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}.")
        if similarity == "cosine" and features.values is None:
            raise InputError("similarity='cosine' needs the activation values (the sae_values column).")
        self.similarity = similarity
        self.n = features.n_rows
        sizes = features.sizes
        self.order = np.lexsort((np.arange(self.n), -sizes))  # walk order: |A_i| desc, position asc
        self.sizes = sizes[self.order]
        frequencies = features.latent_frequencies()
        by_rarity = np.lexsort((np.arange(features.num_latents), frequencies))
        rank = np.empty(features.num_latents, dtype=np.int64)
        rank[by_rarity] = np.arange(features.num_latents)
        self.num_latents = features.num_latents
        self.indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.indptr[1:])
        self.ranks = np.empty(features.nnz, dtype=np.int32)
        self.values = np.empty(features.nnz, dtype=np.float64) if similarity == "cosine" else None
        self._fill_ranked_rows(features, rank)
        self.tail_norms = self._tail_norms() if similarity == "cosine" else None

    def _fill_ranked_rows(self, features: SparseFeatures, rank: np.ndarray) -> None:
        """Rows in walk order, each row's latents replaced by their rank and sorted ascending."""
        start = 0
        while start < self.n:
            stop = int(np.searchsorted(self.indptr, self.indptr[start] + _SORT_CHUNK, side="right"))
            stop = min(max(stop - 1, start + 1), self.n)
            positions, segments = features.entry_positions(self.order[start:stop])
            keys = segments * self.num_latents + rank[features.indices[positions]]
            begin, end = self.indptr[start], self.indptr[stop]
            if self.values is None:
                self.ranks[begin:end] = np.sort(keys) % self.num_latents
            else:
                by_key = np.argsort(keys, kind="stable")
                self.ranks[begin:end] = keys[by_key] % self.num_latents
                raw = features.values[positions][by_key].astype(np.float64)
                norms = np.sqrt(np.bincount(segments, weights=raw * raw, minlength=stop - start))
                safe = np.where(norms > 0, norms, 1.0)
                self.values[begin:end] = raw / np.repeat(safe, self.sizes[start:stop])
            start = stop

    def _tail_norms(self) -> np.ndarray:
        """Per entry, the squared norm of the row from this entry to its end (cosine prefixes)."""
        assert self.values is not None
        squares = self.values * self.values
        running = np.append(np.cumsum(squares[::-1])[::-1], 0.0)  # suffix sums over the whole array
        # minus the suffix sum where the row ends (cancellation error ~1e-10: covered by the prefix margin)
        return running[:-1] - running[np.repeat(self.indptr[1:], self.sizes)]

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


def simscale_pass(
    index: SimScaleIndex, delta: float, budget: int, *, block: int | None = None
) -> SimScalePass:
    """One SimScale walk at threshold ``delta`` that stops once ``budget`` rows are accepted."""
    n = index.n
    block = block or _block_size(index)
    accepted: list[np.ndarray] = []
    accepted_sims: list[np.ndarray] = []
    count = 0
    if delta <= 0:  # every pair is at or above δ: only the first row survives
        return SimScalePass(delta, index.order[:1].copy(), np.zeros(1), examined=min(n, 1))
    prefix = index.prefix_lengths(delta)
    segments = _IndexSegments()
    empty_taken = False
    candidate_pairs = verified_pairs = 0
    lookup = _BlockLookup(index, block)
    start = 0
    while start < n and count < budget:
        stop = min(start + block, n)
        rows = np.arange(start, stop, dtype=np.int64)
        lookup.fill(rows, start)
        q_pos, q_seg = _entries(index.indptr, rows, prefix[rows])
        q_rank = index.ranks[q_pos].astype(np.int64)
        q_slot = q_pos - index.indptr[rows][q_seg]  # position of the entry inside its row
        # candidates among rows accepted before this block
        candidates = segments.probe(q_rank, q_seg + start, q_slot)
        candidate_pairs += len(candidates[0])
        outside = _verify(index, *candidates, delta, lookup, settle=True)
        verified_pairs += outside.verified
        conflict = np.zeros(len(rows), dtype=bool)
        best = np.zeros(len(rows), dtype=np.float64)
        if len(outside.x):
            np.maximum.at(best, outside.x - start, outside.sim)
            conflict[outside.x[outside.sim >= delta] - start] = True
        # pairs inside the block: self-join of the block's prefixes (earlier row first)
        inner = _block_pairs(q_rank, q_seg, q_slot, start)
        candidate_pairs += len(inner[0])
        within = _verify(index, *inner, delta, lookup, settle=False)
        lookup.clear()
        verified_pairs += within.verified
        decided, sims, empty_taken = _decide_block(
            index, rows, start, conflict, best, within, delta, empty_taken, budget - count
        )
        if len(decided):
            accepted.append(decided)
            accepted_sims.append(sims)
            count += len(decided)
            a_pos, a_seg = _entries(index.indptr, decided, prefix[decided])
            a_rows = decided[a_seg]
            segments.add(index.ranks[a_pos].astype(np.int64), a_rows, a_pos - index.indptr[a_rows])
        examined = stop if count < budget else int(decided[-1]) + 1
        start = stop
    order_positions = np.concatenate(accepted) if accepted else np.zeros(0, dtype=np.int64)
    return SimScalePass(
        delta,
        index.order[order_positions],
        np.concatenate(accepted_sims) if accepted_sims else np.zeros(0),
        examined=examined if n else 0,
        candidate_pairs=candidate_pairs,
        verified_pairs=verified_pairs,
    )


def simscale(
    features: SparseFeatures,
    budget: int,
    *,
    delta: float | None = None,
    similarity: str = "jaccard",
    delta_tolerance: float = 5e-3,
    max_steps: int = 40,
    index: SimScaleIndex | None = None,
) -> SimScaleOutcome:
    """SimScale selection of exactly ``budget`` rows, with δ given or found by bisection."""
    n = features.n_rows
    if not 1 <= budget <= n:
        raise InputError(f"budget must be between 1 and the pool size ({n}), got {budget}.")
    index = index or SimScaleIndex(features, similarity)
    steps: list[dict[str, Any]] = []

    def run(value: float) -> SimScalePass:
        outcome = simscale_pass(index, value, budget)
        steps.append(
            {
                "delta": value,
                "accepted": len(outcome.positions),
                "examined": outcome.examined,
                "candidate_pairs": outcome.candidate_pairs,
            }
        )
        logger.info(
            "SimScale δ=%.4f: %d rows accepted after %d examined.",
            value,
            len(outcome.positions),
            outcome.examined,
        )
        return outcome

    if delta is not None:
        outcome = run(float(delta))
        if len(outcome.positions) < budget:
            raise InputError(
                f"With δ={delta} SimScale accepts only {len(outcome.positions)} of the {budget} rows asked for; "
                "raise delta, lower the budget, or leave delta unset to find it automatically."
            )
        return SimScaleOutcome(outcome, steps)
    # invariant: the pass at `low` yields fewer than `budget` rows, the pass at `high` yields the budget
    # every similarity is <= 1 (cosine up to rounding) < high: the pass at `high` accepts every row
    low, high = 0.0, 1.0 + 1e-6
    best = run(high)
    if budget == 1 or len(run(low).positions) >= budget:
        return SimScaleOutcome(run(low) if budget == 1 else best, steps)
    while high - low > delta_tolerance and len(steps) < max_steps:
        middle = (low + high) / 2
        outcome = run(middle)
        if len(outcome.positions) >= budget:
            high, best = middle, outcome
        else:
            low = middle
    return SimScaleOutcome(best, steps)


# -- block machinery ------------------------------------------------------------------------------------
@dataclass
class _Pairs:
    x: np.ndarray
    y: np.ndarray
    sim: np.ndarray
    verified: int = 0


def _entries(indptr: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the first ``lengths[k]`` entries of each row ``rows[k]``, and their segment ``k``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    segments = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    if total == 0:
        return np.zeros(0, dtype=np.int64), segments
    starts = indptr[rows]
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths), segments


def _block_size(index: SimScaleIndex) -> int:
    """Rows per block: the block's dense lookup table (rows × latents) stays around 32 MB."""
    bytes_per_slot = 1 if index.similarity == "jaccard" else 4
    return int(np.clip((1 << 25) // max(index.num_latents * bytes_per_slot, 1), 16, _BLOCK))


class _BlockLookup:
    """Dense table ``(row - start, latent rank) -> present`` (Jaccard) or ``-> entry + 1`` (cosine) for the
    rows of the current block, so exact comparisons are one gather per latent instead of a search."""

    def __init__(self, index: SimScaleIndex, block: int) -> None:
        self.index = index
        dtype = bool if index.similarity == "jaccard" else np.int64
        self.table = np.zeros(block * max(index.num_latents, 1), dtype=dtype)
        self.keys = np.zeros(0, dtype=np.int64)
        self.start = 0

    def fill(self, rows: np.ndarray, start: int) -> None:
        index = self.index
        positions, segments = _entries(index.indptr, rows, index.sizes[rows])
        self.keys = segments * index.num_latents + index.ranks[positions]
        self.start = start
        self.table[self.keys] = True if self.table.dtype == bool else positions + 1

    def clear(self) -> None:
        self.table[self.keys] = 0


class _IndexSegments:
    """Inverted index latent rank → accepted rows, as sorted segments merged like an LSM tree."""

    def __init__(self) -> None:
        self.segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, ranks: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        """Index entries ``(latent rank, row, position of the entry in its row)``."""
        if not len(ranks):
            return
        order = np.argsort(ranks, kind="stable")
        self.segments.append((ranks[order], rows[order], slots[order]))
        while len(self.segments) > 1 and len(self.segments[-1][0]) * 2 >= len(self.segments[-2][0]):
            newer, older = self.segments.pop(), self.segments.pop()
            joined = [np.concatenate([a, b]) for a, b in zip(older, newer, strict=True)]
            merged = np.argsort(joined[0], kind="stable")
            self.segments.append((joined[0][merged], joined[1][merged], joined[2][merged]))

    def probe(self, q_rank: np.ndarray, q_row: np.ndarray, q_slot: np.ndarray) -> tuple[np.ndarray, ...]:
        """Distinct pairs ``(query row, indexed row)`` sharing a prefix latent (see :func:`_count_pairs`)."""
        xs, ys, x_slots, y_slots = [], [], [], []
        for ranks, rows, slots in self.segments:
            low = np.searchsorted(ranks, q_rank, side="left")
            high = np.searchsorted(ranks, q_rank, side="right")
            counts = high - low
            total = int(counts.sum())
            if not total:
                continue
            offsets = np.cumsum(counts) - counts
            hits = np.arange(total, dtype=np.int64) + np.repeat(low - offsets, counts)
            xs.append(np.repeat(q_row, counts))
            x_slots.append(np.repeat(q_slot, counts))
            ys.append(rows[hits])
            y_slots.append(slots[hits])
        if not xs:
            return _no_pairs()
        return _count_pairs(*(np.concatenate(parts) for parts in (xs, ys, x_slots, y_slots)))


def _no_pairs() -> tuple[np.ndarray, ...]:
    empty = np.zeros(0, dtype=np.int64)
    return empty, empty, empty, empty, empty


def _count_pairs(
    x: np.ndarray, y: np.ndarray, x_slot: np.ndarray, y_slot: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Distinct ``(x, y)`` with the number of shared prefix latents and the positions (in ``x`` and in ``y``)
    of the last one shared: every common latent after it lies after both positions (positional bound)."""
    width = int(y.max()) + 1
    keys = x * width + y
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    last_x = np.maximum.reduceat(x_slot[order], starts)
    last_y = np.maximum.reduceat(y_slot[order], starts)
    unique = keys[starts]
    return unique // width, unique % width, counts, last_x, last_y


def _block_pairs(
    q_rank: np.ndarray, q_seg: np.ndarray, q_slot: np.ndarray, start: int
) -> tuple[np.ndarray, ...]:
    """Pairs ``(later row, earlier row)`` of one block that share a prefix latent (see :func:`_count_pairs`)."""
    if not len(q_rank):
        return _no_pairs()
    order = np.lexsort((q_seg, q_rank))
    rank_sorted, seg_sorted, slot_sorted = q_rank[order], q_seg[order], q_slot[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = rank_sorted[1:] != rank_sorted[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
    earlier = np.arange(len(order)) - group_start  # entries before this one in its latent's group
    total = int(earlier.sum())
    if not total:
        return _no_pairs()
    offsets = np.cumsum(earlier) - earlier
    partner = np.arange(total, dtype=np.int64) + np.repeat(group_start - offsets, earlier)
    later_rows = np.repeat(seg_sorted, earlier) + start
    earlier_rows = seg_sorted[partner] + start
    return _count_pairs(later_rows, earlier_rows, np.repeat(slot_sorted, earlier), slot_sorted[partner])


def _verify(
    index: SimScaleIndex,
    x: np.ndarray,
    y: np.ndarray,
    shared_prefix: np.ndarray,
    last_x: np.ndarray,
    last_y: np.ndarray,
    delta: float,
    lookup: _BlockLookup,
    *,
    settle: bool,
) -> _Pairs:
    """Exact similarity of candidate pairs ``(x in block, y earlier)``.

    Jaccard pairs whose shared prefix latents alone already reach δ skip the full comparison, and with
    ``settle`` (every ``y`` is accepted) so do the other pairs of a row that has such a certain conflict.
    """
    if not len(x):
        return _Pairs(x, y, np.zeros(0))
    sim = np.zeros(len(x), dtype=np.float64)
    todo = np.ones(len(x), dtype=bool)
    if index.similarity == "jaccard":
        # size filter: J <= |x| / |y| for |y| >= |x| (y was walked earlier)
        todo &= index.sizes[x] >= delta * index.sizes[y] - _MARGIN
        lower = index.similarity_of(x, y, shared_prefix)
        certain = todo & (lower >= delta)
        sim[certain] = lower[certain]
        todo &= ~certain
        # positional bound: common latents after the last shared prefix latent fit in both remainders
        rest = np.minimum(index.sizes[x] - 1 - last_x, index.sizes[y] - 1 - last_y)
        upper = index.similarity_of(x, y, shared_prefix + rest)
        hopeless = todo & (upper < delta)
        sim[hopeless] = lower[hopeless]
        todo &= ~hopeless
        # a row with one certified conflict needs no more comparisons
        if settle:
            settled = np.zeros(int(x.max()) + 1, dtype=bool)
            settled[x[certain]] = True
            todo &= ~settled[x]
    picks = np.flatnonzero(todo)
    # in chunks of pairs, so the per-entry temporaries stay in cache
    step = max(1, _VERIFY_ENTRIES // max(int(index.sizes.max()) if index.n else 1, 1))
    for begin in range(0, len(picks), step):
        chunk = picks[begin : begin + step]
        sim[chunk] = _exact_similarity(index, x[chunk], y[chunk], lookup)
    return _Pairs(x, y, sim, verified=len(picks))


def _exact_similarity(index: SimScaleIndex, x: np.ndarray, y: np.ndarray, lookup: _BlockLookup) -> np.ndarray:
    """Look every latent of ``y`` up in the block table of ``x`` and combine the matches."""
    positions, pair = _entries(index.indptr, y, index.sizes[y])
    slots = lookup.table[(x - lookup.start)[pair] * index.num_latents + index.ranks[positions]]
    if index.similarity == "jaccard":
        shared = np.bincount(pair[slots], minlength=len(x)).astype(np.float64)
    else:
        assert index.values is not None
        match = slots > 0
        x_positions = slots[match] - 1
        products = index.values[positions[match]] * index.values[x_positions]
        shared = np.bincount(pair[match], weights=products, minlength=len(x))
    return index.similarity_of(x, y, shared)


def _decide_block(
    index: SimScaleIndex,
    rows: np.ndarray,
    start: int,
    conflict: np.ndarray,
    best: np.ndarray,
    within: _Pairs,
    delta: float,
    empty_taken: bool,
    room: int,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Accept the block's rows in walk order (at most ``room``), using pairs inside the block."""
    order = np.lexsort((within.y, within.x))
    px, py, ps = within.x[order] - start, within.y[order] - start, within.sim[order]
    bounds = np.searchsorted(px, np.arange(len(rows) + 1))
    taken = np.zeros(len(rows), dtype=bool)
    chosen: list[int] = []
    sims: list[float] = []
    empty_rows = index.sizes[rows] == 0
    for local in range(len(rows)):
        if conflict[local]:
            continue
        low, high = bounds[local], bounds[local + 1]
        partners_taken = taken[py[low:high]]
        similarity = float(best[local])
        if partners_taken.any():
            partner_sims = ps[low:high][partners_taken]
            if (partner_sims >= delta).any():
                continue
            similarity = max(similarity, float(partner_sims.max()))
        if empty_rows[local]:  # similarity(∅, ∅) = 1: below δ only when δ > 1
            if empty_taken and delta <= 1.0:
                continue
            similarity = max(similarity, 1.0 if empty_taken else 0.0)
            empty_taken = True
        taken[local] = True
        chosen.append(start + local)
        sims.append(similarity)
        if len(chosen) == room:
            break
    return np.asarray(chosen, dtype=np.int64), np.asarray(sims, dtype=np.float64), empty_taken


# -- the selector ---------------------------------------------------------------------------------------------
@register_selector("sae-simscale")
@dataclass
class SAESimScaleSelector(SAEFeatureOptions, Selector):
    """SAE-SimScale: walk rows by number of active latents, keep those below δ similarity to every kept row.

    Per selected row: ``max_similarity`` (to earlier picks; see the module docstring) and ``n_active``.
    ``info``: ``delta``, how it was found, the bisection passes, and the coverage curves.
    """

    delta: float | None = None
    """Similarity threshold; ``None``: the smallest δ (to ``delta_tolerance``) that yields the budget."""
    similarity: str = "jaccard"
    """``jaccard`` on active-latent sets, or ``cosine`` on the pooled activation values."""
    values_column: str = DEFAULT_VALUES_COLUMN
    """Column of pooled activation values (used by ``similarity="cosine"``)."""
    delta_tolerance: float = 5e-3
    """Bisection stops when the bracket around δ is this narrow."""
    random_reference: bool = True
    """Also record the coverage curve of a random subset of the same size (for the report)."""

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
        has_values = self.values_column in dataset.column_names
        if self.similarity == "cosine" and has_values and self.features_column not in dataset.column_names:
            raise InputError(f"Column {self.values_column!r} is present but {self.features_column!r} is not.")
        self.validate_sae_options(dataset, context, *self._extra_columns())

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        return self.ensure_sae_features(dataset, context, *self._extra_columns())

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        values_column = self.values_column if self.similarity == "cosine" else None
        features = self.read_features(dataset, values_column)
        outcome = simscale(
            features,
            budget,
            delta=self.delta,
            similarity=self.similarity,
            delta_tolerance=self.delta_tolerance,
        )
        final = outcome.final
        positions = final.positions[:budget]
        info = coverage_info(features, positions, context, random_reference=self.random_reference)
        info.update(
            delta=final.delta,
            delta_found_by="given" if self.delta is not None else "bisection",
            similarity=self.similarity,
            bisection_steps=len(outcome.steps) if self.delta is None else 0,
            passes=outcome.steps,
            rows_examined=final.examined,
        )
        scores = {
            "max_similarity": final.max_similarity[:budget],
            "n_active": features.sizes[positions],
        }
        return SelectionOutput(positions=positions, scores=scores, info=info)
