"""``select(dataset, method, budget)``: one entry point for every selection method.

Methods register themselves by name (see :mod:`hf_dataselect.selection.base`); importing this package imports
the built-in ones. All of them follow one budget rule: exactly ``budget`` distinct rows (an int, or a fraction
of the pool), deterministic for a given ``seed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

# Built-in methods register themselves on import.
from hf_dataselect.selection import (  # noqa: F401
    baselines,
    deita,
    iterative_kmq,
    kmq,
    perplexity,
    sae_greedy,
    sae_simscale,
)
from hf_dataselect.selection.base import (
    SelectionContext,
    SelectionOutput,
    Selector,
    available_methods,
    make_selector,
    register_selector,
    resolve_budget,
)
from hf_dataselect.selection.result import SelectionResult, find_id_column

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "SelectionContext",
    "SelectionOutput",
    "SelectionResult",
    "Selector",
    "available_methods",
    "register_selector",
    "resolve_budget",
    "select",
]

logger = logging.getLogger("hf_dataselect.selection")


def select(
    dataset: Dataset,
    method: str,
    budget: int | float,
    seed: int = 0,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    formatter: Callable[..., tuple[str, str]] | None = None,
    row_format: str | None = None,
    id_column: str | None = None,
    **options: Any,
) -> SelectionResult:
    """Select ``budget`` rows of ``dataset`` with ``method``.

    Args:
        dataset: a :class:`datasets.Dataset` (any instruction format; see :mod:`hf_dataselect.formatting`).
        method: one of :func:`available_methods` (``random``, ``longest``, ``kcenter``, ``kmq``, ...).
        budget: number of rows, or a fraction of the pool in ``(0, 1]``.
        seed: makes the selection reproducible.
        prompt_column / response_column / formatter / row_format: how rows become text when auto-detection
            is not what you want.
        id_column: column of stable row ids (default: ``id``/``row_id``/``uid``/``idx`` when present, else a
            content hash).
        **options: the method's options (e.g. ``k=``, ``quality_column=``, ``temperature=`` for kMQ).

    Columns a method needs and the dataset lacks (embeddings, clusters, SAE features) are computed and
    logged; bad input raises :class:`~hf_dataselect.errors.InputError` before any of that work starts.
    """
    from hf_dataselect import __version__
    from hf_dataselect.errors import InputError

    started = time.perf_counter()
    selector = make_selector(method, options)
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "select"):
        raise InputError(f"select() needs a datasets.Dataset, got {type(dataset).__name__}.")
    rows = resolve_budget(budget, len(dataset))
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}.")
    context = SelectionContext(
        seed=int(seed),
        column_names=list(dataset.column_names),
        prompt_column=prompt_column,
        response_column=response_column,
        formatter=formatter,
        row_format_name=row_format,
    )
    resolved_id_column = find_id_column(dataset.column_names, id_column)
    if prompt_column or response_column or row_format:
        context.row_format  # noqa: B018  (validates the columns the user named, even if no text is needed)
    selector.validate(dataset, rows, context)

    prepared = selector.prepare(dataset, context)
    output = selector.run(prepared, rows, context)
    positions = np.asarray(output.positions, dtype=np.int64)
    _check_output(method, positions, rows, len(dataset), output)
    pool = prepared
    for name, values in output.new_columns.items():
        pool = pool.remove_columns(name) if name in pool.column_names else pool
        pool = pool.add_column(name, values.tolist() if values.dtype == object else values)
    row_format_description = None
    if "row_format" in context.__dict__:  # only when a method needed text
        row_format_description = context.row_format.describe()
    result = SelectionResult(
        method=method,
        budget=rows,
        seed=int(seed),
        positions=positions,
        scores={k: np.asarray(v) for k, v in output.scores.items()},
        options=selector.options(),
        info=output.info,
        input_fingerprint=getattr(dataset, "_fingerprint", ""),
        input_rows=len(dataset),
        library_version=__version__,
        elapsed_seconds=time.perf_counter() - started,
        pool=pool,
        input_columns=list(dataset.column_names),
        row_format=row_format_description,
        id_column=resolved_id_column,
        artifacts=output.artifacts,
    )
    logger.info(
        "Selected %d of %d rows with %s in %.1f s.", rows, len(dataset), method, result.elapsed_seconds
    )
    return result


def _check_output(
    method: str, positions: np.ndarray, budget: int, pool_size: int, output: SelectionOutput
) -> None:
    """Selectors must honour the budget rule; a violation is a bug in the method, not bad input."""
    if positions.ndim != 1 or len(positions) != budget:
        raise RuntimeError(f"{method} returned {len(positions)} rows instead of {budget}.")
    if len(np.unique(positions)) != budget:
        raise RuntimeError(f"{method} returned duplicate rows.")
    if len(positions) and (positions.min() < 0 or positions.max() >= pool_size):
        raise RuntimeError(f"{method} returned positions outside the pool.")
    for name, values in output.scores.items():
        if len(values) != budget:
            raise RuntimeError(f"{method} returned {len(values)} values of score {name!r} for {budget} rows.")
