"""``perplexity`` baseline: rank rows by the response's perplexity under a reference causal LM (ALGORITHMS.md §7).

``band`` chooses which rows: ``low`` (the most predictable responses), ``high`` (the most surprising) or
``middle`` (the ``budget`` rows around the median, the band that perplexity-filtering studies often keep).
The perplexity comes from a numeric column (default ``perplexity``); when the pool lacks it, it is computed
with :class:`~hf_dataselect.transforms.quality.PerplexityScores` (``model=`` required) through
``dataset.map``, so it is cached like any map. Ties go to the lower row position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.selection.base import SelectionContext, SelectionOutput, Selector, register_selector

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

BANDS = ("low", "high", "middle")


@register_selector("perplexity")
@dataclass
class PerplexitySelector(Selector):
    """Top, bottom or middle ``budget`` rows by response perplexity."""

    band: str = "low"
    """``low``, ``high`` or ``middle``."""
    perplexity_column: str = "perplexity"
    """Numeric column to rank by; computed with ``model`` when missing."""
    model: str | None = None
    """Reference causal LM (path or Hub id) for computing the column."""
    batch_size: int = 8
    max_length: int | None = 1024
    chat_template: bool | None = None
    device: str | None = None
    dtype: str = "auto"

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:
        if self.band not in BANDS:
            raise InputError(f"band must be one of {list(BANDS)}, got {self.band!r}.")
        if self.perplexity_column in dataset.column_names:
            from hf_dataselect.data import numeric_column

            numeric_column(dataset, self.perplexity_column, purpose="perplexity ranking")
            return
        if not self.model:
            raise InputError(
                f"The pool has no {self.perplexity_column!r} column; pass model= (a causal LM) to compute it, "
                f"or add it with ds.map(PerplexityScores(model=...), batched=True)."
            )
        context.check_texts(dataset)

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        if self.perplexity_column in dataset.column_names:
            return dataset
        from hf_dataselect.transforms.quality import PerplexityScores

        row_format = context.row_format
        logger.info(
            "No %r column: measuring %d responses with %s.", self.perplexity_column, len(dataset), self.model
        )
        transform = PerplexityScores(
            model=self.model,
            column=self.perplexity_column,
            batch_size=self.batch_size,
            max_length=self.max_length,
            chat_template=self.chat_template,
            device=self.device,
            dtype=self.dtype,
            prompt_column=row_format.prompt_column if row_format.kind == "columns" else None,
            response_column=row_format.response_column if row_format.kind == "columns" else None,
            formatter=row_format.formatter,
        )
        return dataset.map(transform, batched=True, batch_size=256, desc="Measuring response perplexity")

    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        from hf_dataselect.data import numeric_column

        values = numeric_column(dataset, self.perplexity_column, purpose="perplexity ranking")
        positions = band_positions(values, budget, self.band)
        info = {
            "band": self.band,
            "perplexity_range_selected": [float(values[positions].min()), float(values[positions].max())],
            "perplexity_median_pool": float(np.median(values)),
        }
        return SelectionOutput(positions=positions, scores={"perplexity": values[positions]}, info=info)


def band_positions(values: np.ndarray, budget: int, band: str) -> np.ndarray:
    """Positions of the ``budget`` lowest / highest / middle ``values`` (ties: lower position first).

    ``middle`` takes ranks ``[(n - b) // 2, (n - b) // 2 + b)`` of the ascending order. Returned in rank order
    (ascending perplexity for ``low`` and ``middle``, descending for ``high``).
    """
    positions = np.arange(len(values))
    if band == "high":
        return np.lexsort((positions, -values))[:budget]
    ascending = np.lexsort((positions, values))
    if band == "low":
        return ascending[:budget]
    if band == "middle":
        start = (len(values) - budget) // 2
        return ascending[start : start + budget]
    raise InputError(f"band must be one of {list(BANDS)}, got {band!r}.")
