"""Deita-style baseline: quality first, skipping rows too similar to what is already kept (ALGORITHMS.md §7).

Rows are walked by a quality column, best first (ties: lower position); a row is accepted when its largest
cosine similarity to the rows accepted so far is at most τ (0.9 by default), until the budget. If the walk ends
short of the budget, the best-quality rejected rows fill the rest, and each such row is flagged ``filled``, so
the budget is always met exactly and the manifest says how.

The walk goes in blocks: one matrix product compares a block with every accepted row (in chunks), one more
compares the block with itself, and the accept/reject decisions inside the block are then taken in order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.columns import EmbeddingOptions

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

_BLOCK = 256
_ACCEPTED_CHUNK = 65536


@dataclass
class DeitaWalk:
    """Outcome of :func:`deita_select`."""

    positions: np.ndarray
    """Selected rows: accepted rows in walk order, then filled rows in quality order."""
    max_similarity: np.ndarray
    """Accepted rows: largest cosine to rows accepted before them; filled rows: to all accepted rows."""
    filled: np.ndarray
    """True for rows added after the walk ended short of the budget."""


def deita_select(embeddings: np.ndarray, quality: np.ndarray, budget: int, tau: float = 0.9) -> DeitaWalk:
    """Quality-ordered walk keeping rows whose max cosine to kept rows is ``<= tau``, filled to ``budget``."""
    n = len(embeddings)
    if not 1 <= budget <= n:
        raise InputError(f"budget must be between 1 and the pool size ({n}), got {budget}.")
    x = _normalised(embeddings)
    order = np.lexsort((np.arange(n), -np.asarray(quality, dtype=np.float64)))
    accepted = np.empty(budget, dtype=np.int64)
    accepted_sims = np.empty(budget, dtype=np.float64)
    count = 0
    for start in range(0, n, _BLOCK):
        if count == budget:
            break
        block = order[start : start + _BLOCK]
        block_vectors = x[block]
        best = np.full(len(block), -np.inf)
        for chunk in range(0, count, _ACCEPTED_CHUNK):
            kept = x[accepted[chunk : min(chunk + _ACCEPTED_CHUNK, count)]]
            np.maximum(best, (block_vectors @ kept.T).max(axis=1), out=best)
        inner = block_vectors @ block_vectors.T
        taken: list[int] = []
        for local, row in enumerate(block.tolist()):
            similarity = best[local]
            if taken:
                similarity = max(similarity, float(inner[local, taken].max()))
            if similarity > tau:
                continue
            taken.append(local)
            accepted[count], accepted_sims[count] = row, similarity
            count += 1
            if count == budget:
                break
    filled = np.zeros(budget, dtype=bool)
    if count < budget:
        chosen = np.zeros(n, dtype=bool)
        chosen[accepted[:count]] = True
        rejected = order[~chosen[order]][: budget - count]
        fill_sims = np.full(len(rejected), -np.inf)
        for chunk in range(0, count, _ACCEPTED_CHUNK):
            kept = x[accepted[chunk : min(chunk + _ACCEPTED_CHUNK, count)]]
            np.maximum(fill_sims, (x[rejected] @ kept.T).max(axis=1), out=fill_sims)
        logger.info(
            "deita: the walk kept only %d rows at τ=%.3g; filling %d with the best-quality rejected rows.",
            count,
            tau,
            budget - count,
        )
        accepted[count:], accepted_sims[count:] = rejected, fill_sims
        filled[count:] = True
    sims = np.where(np.isfinite(accepted_sims), accepted_sims, np.nan)
    return DeitaWalk(accepted, sims, filled)


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@register_selector("deita")
@dataclass
class DeitaSelector(EmbeddingOptions, Selector):
    """Quality-sorted walk with a cosine-similarity ceiling τ on embeddings (Deita's "score-first,
    diversity-aware" selection). Needs ``quality_column``.

    Per selected row: ``quality``, ``max_similarity`` (cosine to earlier kept rows; NaN for the first) and
    ``filled`` (added after the walk ended short). ``info``: τ, rows accepted by the walk, rows filled.
    """

    quality_column: str | None = None
    """Numeric quality column, higher is better (a reward-model score, an LLM rating...). Required."""
    tau: float = 0.9
    """Largest cosine similarity to an accepted row that a new row may have."""

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if self.quality_column is None:
            raise InputError(
                "deita needs quality_column= (a numeric column, higher is better), e.g. a reward-model score "
                "from hf_dataselect.RewardScores or a rating column of the dataset."
            )
        from hf_dataselect.data import numeric_column

        numeric_column(dataset, self.quality_column, purpose="deita quality ordering")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int | float) or not math.isfinite(self.tau):
            raise InputError(f"tau must be a number (cosine similarity ceiling), got {self.tau!r}.")
        if self.needs_embeddings(dataset):
            context.check_texts(dataset)

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        return self.ensure_embeddings(dataset, context)

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        from hf_dataselect.data import numeric_column

        assert self.quality_column is not None
        quality = numeric_column(dataset, self.quality_column, purpose="deita quality ordering")
        walk = deita_select(self.embeddings(dataset), quality, budget, float(self.tau))
        scores = {
            "quality": quality[walk.positions],
            "max_similarity": walk.max_similarity,
            "filled": walk.filled,
        }
        info = {
            "tau": float(self.tau),
            "accepted_by_walk": int(budget - walk.filled.sum()),
            "filled": int(walk.filled.sum()),
        }
        return SelectionOutput(positions=walk.positions, scores=scores, info=info)
