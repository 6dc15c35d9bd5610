"""SAE-GreedSelect: budgeted maximum coverage of SAE features (Yang et al. 2025; ALGORITHMS.md §3).

``A_i`` is the set of active latents of row ``i`` and ``U`` the latents covered so far. Each step picks the
row with the largest marginal gain ``|A_i \\ U|`` (or ``Σ w_l`` over ``A_i \\ U`` with per-latent weights),
ties to the larger ``|A_i|`` and then the lower row position, and adds ``A_i`` to ``U``. When every remaining
gain is 0 (all reachable features covered) a new round starts with ``U = ∅``; rows already chosen stay.

Two exact implementations, both equal to :func:`plain_greedy_coverage` (the reference that re-evaluates every
row at every step) pick for pick:

* ``inverted`` (default): the gain of every row is kept current through the latent → rows index (the CSC
  transpose of the features). Covering latent ``l`` subtracts ``w_l`` from the rows that contain it, once per
  round, so a round costs O(active entries) and a step is one ``argmax`` over a packed key
  ``gain · (max|A| + 1) + |A_i|`` (its first maximum is the lowest position among ties).
* ``lazy``: classic lazy greedy, a max-heap of stale upper bounds whose top is re-evaluated (in growing,
  vectorised batches) until the best fresh gain beats every remaining bound. No transposed index, so about
  half the memory, but on Zipf-shaped features it re-evaluates each row several times per round.

Weighted gains use the weights in fixed point (integers, resolution ``2**-20`` of the largest weight), so
sums are exact whatever their order: the two implementations and the reference can never disagree through a
rounding difference. The reported per-row ``gain`` is the float sum of the newly covered latents' weights.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.sparse_features import SAEFeatureOptions, SparseFeatures

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

ALGORITHMS = ("inverted", "lazy")
WEIGHT_RESOLUTION = 2**20
_MAX_BATCH = 8192  # rows the lazy variant evaluates at once when many stale bounds sit at the top
_CURVE_POINTS = 1000  # coverage curves stored in the manifest are subsampled to about this many points
_PICKED = -(2**62)  # packed key of rows already picked (stays negative under any later decrement)


@dataclass
class GreedyCoverage:
    """Outcome of :func:`greedy_coverage` / :func:`plain_greedy_coverage`."""

    positions: np.ndarray
    """Picked rows, in pick order (int64)."""
    gains: np.ndarray
    """Marginal gain of each pick at pick time (int64 without weights, float64 with)."""
    rounds: np.ndarray
    """Round (1, 2, ...) in which each row was picked (int64)."""
    evaluations: int = 0
    """Row gain evaluations (lazy), or rows whose gain was decremented (inverted): the work done."""


def greedy_coverage(
    features: SparseFeatures,
    budget: int,
    *,
    weights: np.ndarray | None = None,
    new_rounds: bool = True,
    algorithm: str = "inverted",
) -> GreedyCoverage:
    """Greedy maximum coverage of the rows' active latents; identical picks to :func:`plain_greedy_coverage`.

    Args:
        features: active latents per row.
        budget: rows to pick, ``1 <= budget <= features.n_rows``.
        weights: optional non-negative weight per latent (``float [>= num_latents]``).
        new_rounds: start a new round (``U = ∅``) when every remaining gain is 0; without it, the remaining
            picks are zero-gain rows in tie-break order.
        algorithm: ``inverted`` (fast, O(entries) per round) or ``lazy`` (heap of stale bounds, less memory).
    """
    if algorithm not in ALGORITHMS:
        raise InputError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}.")
    _check_budget(budget, features.n_rows)
    gains_per_latent = quantize_weights(weights, features)
    run = _inverted_greedy if algorithm == "inverted" else _lazy_greedy
    return run(features, budget, gains_per_latent, weights, new_rounds)


def plain_greedy_coverage(
    features: SparseFeatures,
    budget: int,
    *,
    weights: np.ndarray | None = None,
    new_rounds: bool = True,
) -> GreedyCoverage:
    """Reference greedy: re-evaluates every remaining row at every step (vectorised, but neither lazy nor
    incremental). Same rule and tie-break as :func:`greedy_coverage`; used by the tests (equality) and the
    benchmark (speed-up)."""
    n = features.n_rows
    _check_budget(budget, n)
    gain_of = _GainEvaluator(features, quantize_weights(weights, features))
    sizes = features.sizes
    available = np.ones(n, dtype=bool)
    record = _Record(budget, weights)
    round_gain = 0
    while record.picked < budget:
        current = gain_of.all_gains()
        best_gain = current[available].max()
        if best_gain == 0 and new_rounds and round_gain > 0:
            gain_of.reset()
            record.round += 1
            round_gain = 0
            continue
        tied = available & (current == best_gain)
        tied &= sizes == sizes[tied].max()
        row = int(np.flatnonzero(tied)[0])
        round_gain += int(best_gain)
        available[row] = False
        record.add(row, gain_of.cover(row))
    record.evaluations = record.picked * n
    return record.result()


def _check_budget(budget: int, n: int) -> None:
    if not 1 <= budget <= n:
        raise InputError(f"budget must be between 1 and the pool size ({n}), got {budget}.")


def quantize_weights(weights: np.ndarray | None, features: SparseFeatures) -> np.ndarray | None:
    """Per-latent weights as non-negative integers (fixed point), or ``None`` for plain counts.

    The resolution is ``2**20`` steps for the largest weight, lowered only when a packed key
    ``gain · (max|A| + 1) + |A_i|`` could otherwise overflow int64.
    """
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)[: features.num_latents]
    largest = float(weights.max()) if len(weights) else 0.0
    if largest <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    widest = int(features.sizes.max()) if features.n_rows else 0
    resolution = max(1, min(WEIGHT_RESOLUTION, 2**61 // ((widest + 1) ** 2 + 1)))
    return np.rint(weights / largest * resolution).astype(np.int64)


class _Record:
    """Per-pick outputs shared by the three implementations."""

    def __init__(self, budget: int, weights: np.ndarray | None) -> None:
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.positions = np.empty(budget, dtype=np.int64)
        self.gains = np.empty(budget, dtype=np.float64 if weights is not None else np.int64)
        self.rounds = np.empty(budget, dtype=np.int64)
        self.picked = 0
        self.round = 1
        self.evaluations = 0

    def add(self, row: int, new_latents: np.ndarray) -> None:
        gain = len(new_latents) if self.weights is None else float(self.weights[new_latents].sum())
        self.positions[self.picked], self.gains[self.picked] = row, gain
        self.rounds[self.picked] = self.round
        self.picked += 1

    def result(self) -> GreedyCoverage:
        return GreedyCoverage(self.positions, self.gains, self.rounds, self.evaluations)


def _full_gains(features: SparseFeatures, gains_per_latent: np.ndarray | None) -> np.ndarray:
    """Gain of every row against ``U = ∅`` (int64)."""
    if gains_per_latent is None:
        return features.sizes.astype(np.int64)
    return _GainEvaluator(features, gains_per_latent).all_gains(chunk_rows=65536)


def _inverted_greedy(
    features: SparseFeatures,
    budget: int,
    gains_per_latent: np.ndarray | None,
    weights: np.ndarray | None,
    new_rounds: bool,
) -> GreedyCoverage:
    sizes = features.sizes.astype(np.int64)
    full = _full_gains(features, gains_per_latent)
    scale = int(sizes.max()) + 1
    postings = features.transpose()
    key = full * scale + sizes  # packed: gain first, then |A_i|; argmax's first hit is the lowest row
    covered = np.zeros(features.num_latents, dtype=bool)
    record = _Record(budget, weights)
    round_gain = 0
    while record.picked < budget:
        row = int(np.argmax(key))
        gain = int(key[row]) // scale
        if gain == 0 and new_rounds and round_gain > 0:
            covered[:] = False
            key = np.where(key >= 0, full * scale + sizes, key)
            record.round += 1
            round_gain = 0
            continue
        latents = features.row(row)
        new_latents = latents[~covered[latents]]
        covered[new_latents] = True
        key[row] = _PICKED
        round_gain += gain
        record.add(row, new_latents)
        if len(new_latents):
            positions, segments = postings.entry_positions(new_latents)
            touched = postings.indices[positions]
            record.evaluations += len(touched)
            if gains_per_latent is None:
                np.subtract.at(key, touched, scale)
            else:
                np.subtract.at(key, touched, (gains_per_latent[new_latents] * scale)[segments])
    return record.result()


def _lazy_greedy(
    features: SparseFeatures,
    budget: int,
    gains_per_latent: np.ndarray | None,
    weights: np.ndarray | None,
    new_rounds: bool,
) -> GreedyCoverage:
    gain_of = _GainEvaluator(features, gains_per_latent)
    sizes = features.sizes
    full = _full_gains(features, gains_per_latent)
    heap = _fresh_heap(np.arange(features.n_rows, dtype=np.int64), full, sizes)
    record = _Record(budget, weights)
    round_gain = 0
    while record.picked < budget:
        # evaluate the top of the heap until the best fresh row beats every remaining stale bound
        fresh: list[tuple[int, int, int]] = []
        batch = 1
        while True:
            popped = [heapq.heappop(heap) for _ in range(min(batch, len(heap)))]
            rows = np.fromiter((entry[2] for entry in popped), dtype=np.int64, count=len(popped))
            values = gain_of(rows).tolist()
            record.evaluations += len(rows)
            fresh.extend((-value, entry[1], entry[2]) for value, entry in zip(values, popped, strict=True))
            best = min(fresh)
            if not heap or best < heap[0]:
                break
            batch = min(2 * batch, _MAX_BATCH)
        best_gain = -best[0]
        if best_gain == 0 and new_rounds and round_gain > 0:
            # every remaining gain is 0: start a new round with U = ∅ (bounds are reset to full gains)
            gain_of.reset()
            record.round += 1
            round_gain = 0
            remaining = np.array([entry[2] for entry in heap] + [entry[2] for entry in fresh], dtype=np.int64)
            heap = _fresh_heap(remaining, full[remaining], sizes[remaining])
            continue
        row = best[2]
        round_gain += best_gain
        record.add(row, gain_of.cover(row))
        for entry in fresh:
            if entry[2] != row:
                heapq.heappush(heap, entry)
    return record.result()


def _fresh_heap(rows: np.ndarray, bounds: np.ndarray, sizes: np.ndarray) -> list[tuple[int, int, int]]:
    """Heap entries ``(-bound, -|A_i|, row)``: the heap minimum is the best row by the greedy order."""
    heap = list(zip((-bounds).tolist(), (-sizes).tolist(), rows.tolist(), strict=True))
    heapq.heapify(heap)
    return heap


class _GainEvaluator:
    """Integer marginal gains of rows against the covered set ``U`` of the current round."""

    def __init__(self, features: SparseFeatures, gains_per_latent: np.ndarray | None) -> None:
        self.features = features
        self.gains_per_latent = gains_per_latent
        self.covered = np.zeros(features.num_latents, dtype=bool)
        self._entry_rows: np.ndarray | None = None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        positions, segments = self.features.entry_positions(rows)
        latents = self.features.indices[positions]
        open_entries = ~self.covered[latents]
        if self.gains_per_latent is None:
            return np.bincount(segments[open_entries], minlength=len(rows))
        # integer weights summed in float64 stay exact below 2**53
        summed = np.bincount(
            segments[open_entries], weights=self.gains_per_latent[latents[open_entries]], minlength=len(rows)
        )
        return summed.astype(np.int64)

    def all_gains(self, chunk_rows: int | None = None) -> np.ndarray:
        """Current gains of every row: in row chunks (bounded temporary memory), or in one pass over all
        entries with a cached entry → row map when ``chunk_rows`` is ``None`` (the plain greedy's step)."""
        n = self.features.n_rows
        if chunk_rows is None:
            if self._entry_rows is None:
                self._entry_rows = np.repeat(np.arange(n, dtype=np.int64), self.features.sizes)
            latents = self.features.indices
            open_entries = ~self.covered[latents]
            if self.gains_per_latent is None:
                return np.bincount(self._entry_rows[open_entries], minlength=n)
            weights = self.gains_per_latent[latents[open_entries]]
            return np.bincount(self._entry_rows[open_entries], weights=weights, minlength=n).astype(np.int64)
        out = np.empty(n, dtype=np.int64)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            out[start:stop] = self(np.arange(start, stop, dtype=np.int64))
        return out

    def cover(self, row: int) -> np.ndarray:
        """Add ``A_row`` to ``U``; returns the latents that were not covered before."""
        latents = self.features.row(row)
        new_latents = latents[~self.covered[latents]]
        self.covered[new_latents] = True
        return new_latents

    def reset(self) -> None:
        self.covered[:] = False


# -- per-latent weights -----------------------------------------------------------------------------------
WEIGHT_FILE_TYPES = (".npy", ".safetensors", ".json", ".csv", ".tsv")


def resolve_latent_weights(spec: Any, features: SparseFeatures) -> tuple[np.ndarray | None, str | None]:
    """Per-latent weights from ``spec`` and a short description for the manifest.

    ``spec`` is ``None`` (unweighted), ``"idf"`` (``1 + log((1 + n) / (1 + df))``: rare latents weigh more),
    a sequence/array with one weight per latent id, or a file: ``.npy``/``.safetensors`` (one vector; in
    safetensors the tensor ``weights`` or the only tensor), ``.json`` (a list, or ``{"latent id": weight}``
    with 1.0 for latents not listed), ``.csv``/``.tsv`` with columns ``latent`` and ``weight`` (1.0 for
    latents not listed). Weights must be finite and non-negative.
    """
    if spec is None:
        return None, None
    size = features.num_latents
    if isinstance(spec, str) and spec == "idf":
        df = features.latent_frequencies().astype(np.float64)
        return 1.0 + np.log((1.0 + features.n_rows) / (1.0 + df)), "idf"
    if isinstance(spec, str | os.PathLike):
        weights, description = _weights_from_file(Path(spec), size), f"file {spec}"
    else:
        try:
            weights = np.asarray(spec, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputError(f"latent_weights must be numbers, a file or 'idf': {err}") from err
        description = f"vector of {weights.size} weights"
    if weights.ndim != 1:
        raise InputError(f"latent_weights must be one weight per latent (1-D), got shape {weights.shape}.")
    if len(weights) < size:
        raise InputError(
            f"latent_weights has {len(weights)} entries but the features use latent ids up to {size - 1}."
        )
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InputError("latent_weights must be finite and non-negative.")
    return np.ascontiguousarray(weights, dtype=np.float64), description


def _weights_from_file(path: Path, size: int) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"latent_weights: no such file {path} (or pass 'idf' or a vector).")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise InputError(f"latent_weights: cannot read {path} as a numeric .npy array: {err}") from err
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "weights" in tensors:
            return tensors["weights"]
        if len(tensors) != 1:
            raise InputError(f"{path} holds tensors {sorted(tensors)}; name the weight vector 'weights'.")
        return next(iter(tensors.values()))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"latent_weights: {path} is not valid JSON: {err}") from err
        if isinstance(data, list):
            return np.asarray(data, dtype=np.float64)
        if isinstance(data, dict):
            return _weights_from_pairs(((k, v) for k, v in data.items()), size, path)
        raise InputError(f"{path} must hold a list of weights or a {{latent: weight}} mapping.")
    if suffix in (".csv", ".tsv"):
        import csv

        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames or not {"latent", "weight"} <= set(reader.fieldnames):
                raise InputError(f"{path} needs columns 'latent' and 'weight', found {reader.fieldnames}.")
            return _weights_from_pairs(((r["latent"], r["weight"]) for r in reader), size, path)
    raise InputError(f"latent_weights: unknown file type {suffix!r}; use one of {list(WEIGHT_FILE_TYPES)}.")


def _weights_from_pairs(pairs, size: int, path: Path) -> np.ndarray:
    weights = np.ones(size, dtype=np.float64)
    for latent, weight in pairs:
        try:
            index, value = int(latent), float(weight)
        except (TypeError, ValueError) as err:
            raise InputError(f"{path}: bad latent/weight pair ({latent!r}, {weight!r}).") from err
        if not 0 <= index < size:
            continue  # a latent no row activates cannot change any gain
        weights[index] = value
    return weights


# -- the selector -------------------------------------------------------------------------------------------
@register_selector("sae-greedy")
@dataclass
class SAEGreedySelector(SAEFeatureOptions, Selector):
    """SAE-GreedSelect: lazy greedy maximum coverage of active SAE latents, with new rounds on saturation.

    Per selected row: ``gain`` (marginal gain at pick time), ``round`` and ``n_active`` (``|A_i|``).
    ``info``: ``coverage_curve`` (distinct latents covered vs rows selected) and ``coverage_curve_random``
    (the same for a seeded random subset of the same size), rounds, latents covered, lazy evaluations.
    """

    latent_weights: Any = None
    """Per-latent weights: ``None``, ``"idf"``, a vector, or a ``.npy``/``.safetensors``/``.json``/``.csv``
    file (see :func:`resolve_latent_weights`)."""
    new_rounds: bool = True
    """Start a new round (``U = ∅``) when every remaining gain is 0."""
    algorithm: str = "inverted"
    """``inverted`` (O(entries) per round) or ``lazy`` (heap of stale bounds, about half the memory)."""
    random_reference: bool = True
    """Also record the coverage curve of a random subset of the same size (for the report)."""

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if isinstance(self.latent_weights, str | os.PathLike) and self.latent_weights != "idf":
            path = Path(self.latent_weights)
            if not path.is_file():
                raise InputError(f"latent_weights: no such file {path} (or pass 'idf' or a vector).")
            if path.suffix.lower() not in WEIGHT_FILE_TYPES:
                raise InputError(
                    f"latent_weights: unknown file type {path.suffix!r}; use one of {list(WEIGHT_FILE_TYPES)}."
                )
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}.")
        self.validate_sae_options(dataset, context)

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        return self.ensure_sae_features(dataset, context)

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        features = self.read_features(dataset)
        weights, weight_description = resolve_latent_weights(self.latent_weights, features)
        outcome = greedy_coverage(
            features, budget, weights=weights, new_rounds=self.new_rounds, algorithm=self.algorithm
        )
        info = coverage_info(features, outcome.positions, context, random_reference=self.random_reference)
        info.update(
            rounds=int(outcome.rounds.max()),
            work=outcome.evaluations,
            latent_weights=weight_description,
        )
        scores = {
            "gain": outcome.gains,
            "round": outcome.rounds,
            "n_active": features.sizes[outcome.positions],
        }
        return SelectionOutput(positions=outcome.positions, scores=scores, info=info)


def coverage_info(
    features: SparseFeatures,
    positions: np.ndarray,
    context: SelectionContext,
    *,
    random_reference: bool = True,
) -> dict[str, Any]:
    """Coverage facts shared by the SAE selectors: the curve (subsampled), its random reference, totals."""
    curve = features.coverage_curve(positions)
    steps = _curve_steps(len(positions))
    info: dict[str, Any] = {
        "num_latents": features.num_latents,
        "latents_active_in_pool": int(np.count_nonzero(features.latent_frequencies())),
        "latents_covered": int(curve[-1]) if len(curve) else 0,
        "coverage_curve_rows": steps + 1,
        "coverage_curve": curve[steps],
    }
    if random_reference:
        order = context.rng(0x5AE).choice(features.n_rows, size=len(positions), replace=False)
        random_curve = features.coverage_curve(order)
        info["coverage_curve_random"] = random_curve[steps]
        info["latents_covered_random"] = int(random_curve[-1]) if len(random_curve) else 0
    return info


def _curve_steps(budget: int) -> np.ndarray:
    """0-based indices at which a coverage curve is kept (every step for small budgets)."""
    if budget <= _CURVE_POINTS:
        return np.arange(budget, dtype=np.int64)
    return np.unique(np.linspace(0, budget - 1, _CURVE_POINTS).round().astype(np.int64))
