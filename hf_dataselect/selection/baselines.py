"""Baselines with the same budget rule and output as the diversity selectors (ALGORITHMS.md §7).

* ``random``  — uniform without replacement.
* ``longest`` — the ``budget`` rows with the longest response in tokens ("Long Is More for Alignment").
* ``kcenter`` — farthest-first traversal on embeddings, from a seeded random start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector
from hf_dataselect.selection.columns import EmbeddingOptions

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")


@register_selector("random")
@dataclass
class RandomSelector(Selector):
    """Uniform sample without replacement; positions returned in increasing order."""

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        positions = np.sort(context.rng().choice(len(dataset), size=budget, replace=False))
        return SelectionOutput(positions=positions)


@register_selector("longest")
@dataclass
class LongestSelector(Selector):
    """Top-``budget`` rows by response length in tokens (ties: lower position first)."""

    tokenizer: str | None = None
    """Tokenizer that counts tokens (path or Hub id); ``None``: the offline all-MiniLM-L6-v2 tokenizer."""
    length_column: str | None = None
    """Use precomputed lengths from this numeric column instead of tokenizing."""

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if self.length_column is not None:
            from hf_dataselect.data import numeric_column

            numeric_column(dataset, self.length_column, purpose="longest")
        else:
            context.check_texts(dataset)

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        if self.length_column is not None:
            from hf_dataselect.data import numeric_column

            lengths = numeric_column(dataset, self.length_column, purpose="longest")
        else:
            lengths = self._response_tokens(dataset, context).astype(np.float64)
        order = np.lexsort((np.arange(len(lengths)), -lengths))
        positions = order[:budget]
        return SelectionOutput(positions=positions, scores={"response_tokens": lengths[positions]})

    def _response_tokens(self, dataset: Dataset, context: SelectionContext) -> np.ndarray:
        from hf_dataselect.models import load_tokenizer

        prompts, responses = context.check_texts(dataset)
        texts = responses
        if not context.row_format.has_response:
            logger.info("longest: rows have no separate response; measuring the whole text.")
            texts = prompts
        tokenizer = load_tokenizer(self.tokenizer)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), 4096):
            encoded = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
            lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
        return lengths


@register_selector("kcenter")
@dataclass
class KCenterSelector(EmbeddingOptions, Selector):
    """Greedy k-center (farthest-first traversal) on embeddings, Euclidean distance.

    The first row is drawn with the seed; each next row is the one farthest from everything selected so
    far (ties: lower position). The per-row score is that distance at pick time.
    """

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if self.needs_embeddings(dataset):
            context.check_texts(dataset)

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        return self.ensure_embeddings(dataset, context)

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        x = self.embeddings(dataset)
        squared_norms = np.einsum("ij,ij->i", x, x)
        first = int(context.rng().integers(len(x)))
        positions = np.empty(budget, dtype=np.int64)
        pick_distance = np.empty(budget, dtype=np.float64)
        nearest = np.full(len(x), np.inf)
        current, distance = first, np.nan
        for step in range(budget):
            positions[step], pick_distance[step] = current, distance
            sq = squared_norms - 2.0 * (x @ x[current]) + squared_norms[current]
            np.minimum(nearest, np.maximum(sq, 0.0), out=nearest)
            nearest[current] = -np.inf  # never pick a selected row again
            if step + 1 < budget:
                current = int(np.argmax(nearest))
                distance = float(np.sqrt(nearest[current]))
        return SelectionOutput(positions=positions, scores={"distance_to_selected": pick_distance})
