"""Iterative kMQ: kMQ, then rounds that reweight clusters by training signals (Yu et al. 2024; ALGORITHMS.md §6).

:class:`IterativeKMQ` is the round engine, usable with or without a Trainer::

    engine = IterativeKMQ(clusters, budget_per_round=1000, seed=0)
    rows = engine.next_round()                   # round 0: exactly static kMQ on the same clusters and seed
    ... train on rows, score them (S_i = score(prompt, gold) - score(prompt, generated)) ...
    rows = engine.next_round(scores)             # reweight clusters, then sample new rows

Rules, following the paper's text rather than its released code:

* **Weights** start uniform. After a round, the cluster score ``s_j`` is the mean ``S_i`` over the scored rows
  of cluster ``j`` and ``w_j ← w_j · softmax(s / T)_j``, renormalised. When only some clusters have scored
  rows, the scored clusters share the total weight they held before in proportion to ``w_j · exp(s_j / T)``
  and the others keep their weight exactly. With every cluster scored this *is* ``w · softmax(s/T)``
  renormalised. With some unscored, a softmax over the scored subset has no natural scale; this choice keeps
  "clusters without scored rows keep their weight" true after renormalisation (scaling the factors to a
  mean of 1 instead would still move the unscored weights when the scored ones are renormalised).
* **Allocation**: cluster ``j`` gets a share of the round's rows ∝ ``w_j · n_j`` (``n_j`` its size in the
  pool), so uniform weights reproduce kMQ's size-proportional split and the weights act as a correction to
  it (the released code gives every cluster an equal quota instead). Largest-remainder rounding by default,
  or a multinomial draw; a cluster with fewer rows left than its share is exhausted and the rest is
  re-allocated over the others (:func:`~hf_dataselect.selection.allocation.allocate_budget`).
* **Inside a cluster** rows are drawn without replacement, ∝ ``exp(q_i / T_q)`` for an optional quality
  ``q`` (else uniformly), from the rows not selected in any earlier round, exactly as static kMQ does.
* **Rounds never repeat a row**: the union of the rounds is the cumulative selection of the paper (``b/N``
  new rows per round); in a Trainer each epoch trains on its round's new rows (continued fine-tuning).
* **Randomness** of round ``r`` comes from ``numpy.random.default_rng([seed, r])`` (round 0 from
  ``default_rng([seed])``, the stream static kMQ uses), so a round can be recomputed from the weights alone:
  resuming and multi-process runs make identical selections, and :meth:`IterativeKMQ.state_dict` holds only
  weights and digests.

The ``iterative-kmq`` method of :func:`hf_dataselect.select` runs the same rounds offline, taking ``S_i`` from
a score column of the pool (e.g. a reward gap computed beforehand); for scores from the model being trained,
use :class:`~hf_dataselect.training.DataSelectionCallback`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.allocation import allocate_budget, gumbel_keys, top_m_by_group
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.columns import ClusteringOptions, check_k, cluster_labels

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

ALLOCATIONS = ("largest_remainder", "multinomial")
STATE_VERSION = 1


@dataclass
class IterationRound:
    """What happened in one round."""

    index: int
    positions: np.ndarray
    """Pool positions selected in this round (ascending)."""
    weights: np.ndarray
    """Cluster weights that allocated this round."""
    quota: np.ndarray
    """Rows given to each cluster."""
    scores: dict[int, float] | None = None
    """Position -> ``S_i`` for the rows scored after this round (``None`` until :meth:`IterativeKMQ.update`)."""
    cluster_scores: np.ndarray | None = None
    """Mean ``S_i`` per cluster; NaN for clusters without a scored row."""
    weights_after: np.ndarray | None = None
    """Weights after the update from this round's scores."""

    def as_dict(self, clusters: np.ndarray) -> dict[str, Any]:
        """JSON-ready record (positions with their cluster and score, weights before/after)."""
        scores = self.scores or {}
        return {
            "round": self.index,
            "positions": self.positions.tolist(),
            "clusters": clusters[self.positions].tolist(),
            "scores": [_finite_or_none(scores.get(int(p))) for p in self.positions],
            "weights": self.weights.tolist(),
            "quota": self.quota.tolist(),
            "cluster_scores": None
            if self.cluster_scores is None
            else [_finite_or_none(v) for v in self.cluster_scores],
            "weights_after": None if self.weights_after is None else self.weights_after.tolist(),
        }


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def positions_digest(positions: np.ndarray) -> str:
    """Short, order-sensitive fingerprint of a selection (stored in states, compared on resume)."""
    return hashlib.sha256(np.ascontiguousarray(positions, dtype=np.int64).tobytes()).hexdigest()[:16]


def reweight(weights: np.ndarray, cluster_scores: np.ndarray, temperature: float) -> np.ndarray:
    """``w ← w · softmax(s/T)``, renormalised; clusters with NaN score keep their weight (module docstring)."""
    weights = np.asarray(weights, dtype=np.float64)
    scores = np.asarray(cluster_scores, dtype=np.float64)
    scored = ~np.isnan(scores)
    new = weights.copy()
    if scored.any():
        logits = scores[scored] / temperature
        factors = np.exp(logits - logits.max())  # softmax up to a constant; the constant cancels below
        updated = weights[scored] * factors
        if updated.sum() > 0:
            new[scored] = updated * (weights[scored].sum() / updated.sum())
    return new / new.sum()


def allocate_multinomial(
    rng: np.random.Generator, budget: int, weights: np.ndarray, capacities: np.ndarray
) -> np.ndarray:
    """Slots per cluster drawn from a multinomial ∝ ``weights``; overflow beyond a capacity is redrawn."""
    weights = np.asarray(weights, dtype=np.float64)
    capacities = np.asarray(capacities, dtype=np.int64)
    if budget > capacities.sum():
        raise InputError(f"budget {budget} is larger than the rows available ({int(capacities.sum())}).")
    allocation = np.zeros_like(capacities)
    remaining = int(budget)
    while remaining > 0:
        room = capacities - allocation
        share = np.where(room > 0, weights, 0.0)
        if share.sum() <= 0:  # only zero-weight clusters have room: share by room, as allocate_budget does
            share = room.astype(np.float64)
        draw = rng.multinomial(remaining, share / share.sum())
        taken = np.minimum(draw, room)
        allocation += taken
        remaining -= int(taken.sum())
    return allocation


class IterativeKMQ:
    """The rounds of iterative kMQ over a clustered pool (see the module docstring for the rules).

    Args:
        clusters: cluster id (``0..k-1``) of every pool row.
        budget_per_round: rows selected per round (the epoch length when used in training).
        rounds: number of rounds planned; when given, the pool must hold ``rounds · budget_per_round`` rows.
        temperature: ``T`` of the cluster reweighting ``softmax(s / T)``.
        quality: optional per-row quality ``q`` for in-cluster sampling ∝ ``exp(q / quality_temperature)``.
        allocation: ``"largest_remainder"`` (deterministic split) or ``"multinomial"``.
        seed: seeds every round (round ``r`` uses ``default_rng([seed, r])``).
        exclude: rows that may never be selected (e.g. rows the trainer dropped), as a mask or positions.
    """

    def __init__(
        self,
        clusters: np.ndarray,
        budget_per_round: int,
        *,
        rounds: int | None = None,
        temperature: float = 1.0,
        quality: np.ndarray | None = None,
        quality_temperature: float = 1.0,
        allocation: str = "largest_remainder",
        seed: int = 0,
        exclude: np.ndarray | None = None,
    ) -> None:
        labels = np.asarray(clusters)
        if labels.ndim != 1 or len(labels) == 0:
            raise InputError("clusters must be a non-empty 1-D array of cluster ids.")
        if not np.issubdtype(labels.dtype, np.integer) and not (
            np.isfinite(labels).all() and np.equal(np.mod(labels, 1), 0).all()
        ):
            raise InputError("clusters must hold integer cluster ids.")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise InputError("cluster ids must be non-negative.")
        if allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}.")
        for name, value in (("temperature", temperature), ("quality_temperature", quality_temperature)):
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value!r}.")
        if isinstance(budget_per_round, bool) or not isinstance(budget_per_round, int | np.integer):
            raise InputError(f"budget_per_round must be an integer number of rows, got {budget_per_round!r}.")
        if budget_per_round < 1:
            raise InputError(f"budget_per_round must be at least 1 row, got {budget_per_round}.")
        self.clusters = labels
        self.k = int(labels.max()) + 1
        self.sizes = np.bincount(labels, minlength=self.k)
        self.budget_per_round = int(budget_per_round)
        self.temperature = float(temperature)
        self.quality_temperature = float(quality_temperature)
        self.allocation = allocation
        self.seed = int(seed)
        self.quality = None
        if quality is not None:
            q = np.asarray(quality, dtype=np.float64)
            if q.shape != labels.shape:
                raise InputError(f"quality has {q.shape[0] if q.ndim else 0} values for {len(labels)} rows.")
            if not np.isfinite(q).all():
                raise InputError("quality has NaN or infinite values.")
            self.quality = q
        self.excluded = np.zeros(len(labels), dtype=bool)
        if exclude is not None:
            exclude = np.asarray(exclude)
            if exclude.dtype == bool:
                if exclude.shape != labels.shape:
                    raise InputError("exclude mask must have one entry per row.")
                self.excluded = exclude.copy()
            else:
                self.excluded[exclude.astype(np.int64)] = True
        self.available = ~self.excluded
        self.weights = np.full(self.k, 1.0 / self.k)
        self.history: list[IterationRound] = []
        self.rounds = rounds
        usable = int(self.available.sum())
        if self.budget_per_round > usable:
            raise InputError(
                f"budget_per_round {self.budget_per_round} is larger than the pool ({usable} rows)."
            )
        if rounds is not None:
            if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
                raise InputError(f"rounds must be a positive integer, got {rounds!r}.")
            if rounds * self.budget_per_round > usable:
                raise InputError(
                    f"{rounds} rounds × {self.budget_per_round} rows = {rounds * self.budget_per_round} rows, "
                    f"but the pool has {usable}: every round takes rows not selected before. Lower the "
                    "budget per round or the number of rounds (epochs)."
                )

    # -- rounds --------------------------------------------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        """Number of rounds selected so far."""
        return len(self.history)

    @property
    def selected(self) -> np.ndarray:
        """Every position selected so far, round by round."""
        if not self.history:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([r.positions for r in self.history])

    def remaining_per_cluster(self) -> np.ndarray:
        """Rows of each cluster that later rounds may still select."""
        return np.bincount(self.clusters[self.available], minlength=self.k)

    def next_round(self, scores: np.ndarray | Mapping[int, float] | None = None) -> np.ndarray:
        """Positions of the next round; after the first round pass the previous round's scores."""
        if self.history:
            if scores is None:
                raise InputError(
                    "next_round() needs the scores of the previous round's rows (use select() to draw "
                    "again without a weight update)."
                )
            self.update(scores)
        elif scores is not None:
            raise InputError("The first round is plain kMQ: call next_round() without scores.")
        return self.select()

    def select(self, rows: int | None = None) -> np.ndarray:
        """Draw the next round with the current weights (ascending positions).

        ``rows`` overrides ``budget_per_round`` for this round (e.g. to spread a total budget unevenly).
        """
        index = len(self.history)
        rows = self.budget_per_round if rows is None else int(rows)
        if self.rounds is not None and index >= self.rounds:
            raise InputError(f"All {self.rounds} planned rounds have been selected.")
        remaining = self.remaining_per_cluster()
        if rows > remaining.sum():
            raise InputError(
                f"Round {index} needs {rows} new rows but only {int(remaining.sum())} "
                "unselected rows are left in the pool."
            )
        shares = self.weights * self.sizes
        if self.allocation == "multinomial":
            quota = allocate_multinomial(self._rng(index, 1), rows, shares, remaining)
        else:
            quota = allocate_budget(rows, shares, remaining)
        log_weights = None if self.quality is None else self.quality / self.quality_temperature
        keys = gumbel_keys(self._rng(index), len(self.clusters), log_weights)
        candidates = np.flatnonzero(self.available)
        positions = candidates[top_m_by_group(keys[candidates], self.clusters[candidates], quota)]
        self.available[positions] = False
        self.history.append(
            IterationRound(index=index, positions=positions, weights=self.weights.copy(), quota=quota)
        )
        return positions

    def update(self, scores: np.ndarray | Mapping[int, float]) -> np.ndarray:
        """Reweight clusters from the scores of the last round's rows; returns the new weights.

        ``scores`` is aligned with the last round's positions, or a mapping ``position -> S_i`` for the rows
        that were scored (a subset is fine; clusters without a scored row keep their weight).
        """
        if not self.history:
            raise InputError("There is no round to score yet; call next_round() first.")
        last = self.history[-1]
        if last.weights_after is not None:
            raise InputError(f"Round {last.index} has already been scored.")
        by_position = self._score_mapping(last.positions, scores)
        positions = np.fromiter(by_position.keys(), dtype=np.int64, count=len(by_position))
        values = np.fromiter(by_position.values(), dtype=np.float64, count=len(by_position))
        sums = np.bincount(self.clusters[positions], weights=values, minlength=self.k)
        counts = np.bincount(self.clusters[positions], minlength=self.k)
        with np.errstate(invalid="ignore", divide="ignore"):
            cluster_scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        last.scores = by_position
        last.cluster_scores = cluster_scores
        self.weights = reweight(self.weights, cluster_scores, self.temperature)
        last.weights_after = self.weights.copy()
        return self.weights

    def _score_mapping(
        self, positions: np.ndarray, scores: np.ndarray | Mapping[int, float]
    ) -> dict[int, float]:
        if isinstance(scores, Mapping):
            allowed = set(positions.tolist())
            foreign = [p for p in scores if int(p) not in allowed]
            if foreign:
                raise InputError(
                    f"Scores given for rows outside the last round, e.g. positions {foreign[:5]}."
                )
            mapping = {int(p): float(v) for p, v in scores.items()}
        else:
            values = np.asarray(scores, dtype=np.float64)
            if values.shape != positions.shape:
                raise InputError(
                    f"Got {values.size} scores for the {len(positions)} rows of the last round; pass one "
                    "per row (in round order) or a mapping position -> score."
                )
            mapping = dict(zip(positions.tolist(), values.tolist(), strict=True))
        bad = [p for p, v in mapping.items() if not np.isfinite(v)]
        if bad:
            raise InputError(
                f"The scorer returned NaN or infinite scores for {len(bad)} row(s), e.g. positions {bad[:5]}. "
                "Check the scorer (a NaN loss usually means an empty response or a broken model)."
            )
        return mapping

    def _rng(self, index: int, stream: int | None = None) -> np.random.Generator:
        key = [self.seed] if index == 0 else [self.seed, index]
        if stream is not None:
            key = [self.seed, index, stream]
        return np.random.default_rng(key)

    # -- state -----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Settings a resumed engine must share with the one that saved its state."""
        return {
            "budget_per_round": self.budget_per_round,
            "temperature": self.temperature,
            "quality_temperature": self.quality_temperature,
            "allocation": self.allocation,
            "seed": self.seed,
            "k": self.k,
            "rows": len(self.clusters),
            "clusters_digest": positions_digest(self.clusters),
            "excluded_digest": positions_digest(np.flatnonzero(self.excluded)),
            "quality_digest": None
            if self.quality is None
            else hashlib.sha256(self.quality.tobytes()).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-ready state: config, and per round the weights, a digest and the cluster scores.

        Selections are not stored: :meth:`load_state_dict` recomputes them from the weights (they depend only
        on weights, seed and earlier rounds) and checks the digests.
        """
        rounds = []
        for r in self.history:
            rounds.append(
                {
                    "rows": len(r.positions),
                    "weights": r.weights.tolist(),
                    "positions_digest": positions_digest(r.positions),
                    "cluster_scores": None
                    if r.cluster_scores is None
                    else [_finite_or_none(v) for v in r.cluster_scores],
                    "weights_after": None if r.weights_after is None else r.weights_after.tolist(),
                }
            )
        return {"version": STATE_VERSION, "config": self.config(), "rounds": rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replay a saved state on a fresh engine (same clusters, options and seed)."""
        if self.history:
            raise InputError("load_state_dict() needs a fresh IterativeKMQ (no rounds selected yet).")
        if state.get("version") != STATE_VERSION:
            raise InputError(f"Unknown iterative-kMQ state version {state.get('version')!r}.")
        saved, current = dict(state["config"]), self.config()
        different = sorted(key for key in current if saved.get(key) != current[key])
        if different:
            details = ", ".join(f"{key}: saved {saved.get(key)!r}, now {current[key]!r}" for key in different)
            raise InputError(f"The saved selection state does not match this setup ({details}).")
        for record in state["rounds"]:
            self.weights = np.asarray(record["weights"], dtype=np.float64)
            positions = self.select(record["rows"])
            if positions_digest(positions) != record["positions_digest"]:
                raise InputError(
                    f"Replaying round {len(self.history) - 1} gave a different selection than the saved one; "
                    "the pool, its clusters or the library version changed."
                )
            if record["weights_after"] is not None:
                last = self.history[-1]
                last.cluster_scores = np.array(
                    [np.nan if v is None else v for v in record["cluster_scores"]], dtype=np.float64
                )
                self.weights = np.asarray(record["weights_after"], dtype=np.float64)
                last.weights_after = self.weights.copy()


# -- offline selector ----------------------------------------------------------------------------------------
@register_selector("iterative-kmq")
@dataclass
class IterativeKMQSelector(ClusteringOptions, Selector):
    """Iterative kMQ offline: rounds reweighted by a per-row score column instead of a model in training.

    The budget is split over ``rounds`` (as evenly as possible); after each round the scores of the rows it
    selected (and only those, as in training) update the cluster weights. Rows come back in pick order,
    round by round.
    """

    score_column: str | None = None
    """Per-row ``S_i`` (higher = the cluster deserves more rows), e.g. reward(gold) − reward(generated)."""
    rounds: int = 3
    temperature: float = 1.0
    """``T`` of the cluster reweighting ``softmax(s / T)``."""
    quality_column: str | None = None
    """Optional in-cluster sampling weights ∝ exp(q / quality_temperature), as in kMQ."""
    quality_temperature: float = 1.0
    allocation: str = "largest_remainder"

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        from hf_dataselect.data import numeric_column

        if self.score_column is None:
            raise InputError(
                "iterative-kmq needs score_column= (per-row S_i, e.g. reward(gold) - reward(generated)). To "
                "score with the model being trained, use hf_dataselect.training.DataSelectionCallback."
            )
        numeric_column(dataset, self.score_column, purpose="iterative-kmq scores")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise InputError(f"rounds must be a positive integer, got {self.rounds!r}.")
        if budget < self.rounds:
            raise InputError(f"budget {budget} is smaller than the number of rounds ({self.rounds}).")
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}.")
        for name in ("temperature", "quality_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value!r}.")
        if self.quality_column is not None:
            numeric_column(dataset, self.quality_column, purpose="iterative-kmq quality weighting")
        check_k(self.k, len(dataset))
        if self.cluster_column not in dataset.column_names and self.needs_embeddings(dataset):
            context.check_texts(dataset)

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        if self.cluster_column in dataset.column_names:
            return dataset
        return self.ensure_embeddings(dataset, context)

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        from hf_dataselect.data import numeric_column

        info: dict[str, Any] = {}
        new_columns: dict[str, np.ndarray] = {}
        artifacts: dict[str, Any] = {}
        if self.cluster_column in dataset.column_names:
            labels = cluster_labels(dataset, self.cluster_column)
            info["clustering"] = {"source": f"column {self.cluster_column!r}", "k": int(labels.max()) + 1}
        else:
            kmeans = self.fit_clusters(dataset, context.seed)
            labels = kmeans.labels
            info["clustering"] = kmeans.metadata()
            new_columns = {self.cluster_column: labels, f"{self.cluster_column}_distance": kmeans.distances}
            artifacts = {"centroids.safetensors": kmeans}

        scores = numeric_column(dataset, self.score_column, purpose="iterative-kmq scores")
        quality = None
        if self.quality_column is not None:
            quality = numeric_column(dataset, self.quality_column, purpose="iterative-kmq quality weighting")
        per_round = [
            budget // self.rounds + (1 if r < budget % self.rounds else 0) for r in range(self.rounds)
        ]
        engine = IterativeKMQ(
            labels,
            per_round[0],
            temperature=self.temperature,
            quality=quality,
            quality_temperature=self.quality_temperature,
            allocation=self.allocation,
            seed=context.seed,
        )
        picked: list[np.ndarray] = []
        for index, size in enumerate(per_round):
            if index > 0:
                engine.update(scores[picked[-1]])
            picked.append(engine.select(size))
        positions = np.concatenate(picked)
        round_of = np.concatenate([np.full(len(p), i) for i, p in enumerate(picked)])
        k = engine.k
        info.update(
            cluster_sizes=engine.sizes,
            selected_per_cluster=np.bincount(labels[positions], minlength=k),
            rounds=[
                {
                    "round": r.index,
                    "rows": len(r.positions),
                    "weights": r.weights,
                    "quota": r.quota,
                    "cluster_scores": r.cluster_scores,
                    "weights_after": r.weights_after,
                }
                for r in engine.history
            ],
            final_weights=engine.weights,
        )
        return SelectionOutput(
            positions=positions,
            scores={"cluster": labels[positions], "round": round_of, "score": scores[positions]},
            info=info,
            new_columns=new_columns,
            artifacts=artifacts,
        )
