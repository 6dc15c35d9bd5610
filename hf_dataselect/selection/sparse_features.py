"""Per-row SAE features as one CSR structure, read from the ``sae_indices``/``sae_values`` columns via Arrow.

A pool of a million rows with ~200 active latents each holds 200 million (latent, value) pairs. Python sets of
sets would need tens of gigabytes; the Arrow list column already *is* a CSR matrix (offsets + flat values), so
:meth:`SparseFeatures.from_dataset` hands its buffers to numpy without a per-row loop (zero-copy when the
column is one contiguous chunk, one concatenation otherwise).

Invariants every selector relies on: row ``i`` owns ``indices[indptr[i]:indptr[i+1]]``, strictly ascending
latent ids in ``[0, num_latents)``; ``values`` (optional) is aligned with ``indices``. Input that breaks the
order (user-made columns) is sorted and de-duplicated once, keeping the largest value of a repeated latent.

:class:`SAEFeatureOptions` is the mixin that gives the SAE selectors their ``sae=``/``hookpoint=``/...
options and computes the feature columns with
:func:`hf_dataselect.transforms.sae_features.add_sae_features` when a pool does not have them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dataselect.selection.base import SelectionContext

logger = logging.getLogger("hf_dataselect.selection")

DEFAULT_FEATURES_COLUMN = "sae_indices"
DEFAULT_VALUES_COLUMN = "sae_values"
_CHECK_CHUNK = 1 << 24  # entries per validation chunk (bounds temporary memory on huge pools)


@dataclass(frozen=True)
class SparseFeatures:
    """Active latents (and optionally their pooled activations) of every row, in CSR form."""

    indptr: np.ndarray
    """``int64 [rows + 1]``: row ``i`` owns entries ``indptr[i]:indptr[i + 1]``."""
    indices: np.ndarray
    """``int32 [entries]``: latent ids, strictly ascending within each row."""
    num_latents: int
    """Size of the latent space (``max id + 1`` unless the caller knew better)."""
    values: np.ndarray | None = None
    """``float32 [entries]``: pooled activation of each active latent, when read."""

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def sizes(self) -> np.ndarray:
        """``|A_i|``: number of active latents of each row (int64)."""
        return np.diff(self.indptr)

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def row_values(self, i: int) -> np.ndarray:
        if self.values is None:
            raise ValueError("These features were read without values.")
        return self.values[self.indptr[i] : self.indptr[i + 1]]

    def entry_positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entry positions of ``rows`` (concatenated in the given order) and the segment of each entry.

        ``indices[positions]`` are the latents of ``rows[0]``, then of ``rows[1]``...; ``segments`` holds
        ``0, 0, ..., 1, 1, ...`` so that ``np.bincount(segments, ...)`` reduces per row. One vectorised
        gather instead of a Python loop over rows.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        total = int(lengths.sum())
        segments = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
        if total == 0:
            return np.zeros(0, dtype=np.int64), segments
        segment_starts = np.cumsum(lengths) - lengths
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - segment_starts, lengths)
        return positions, segments

    def take(self, rows: np.ndarray) -> SparseFeatures:
        """The features of ``rows`` (in that order) as a new CSR structure."""
        rows = np.asarray(rows, dtype=np.int64)
        positions, _ = self.entry_positions(rows)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self.indptr[rows + 1] - self.indptr[rows], out=indptr[1:])
        values = None if self.values is None else self.values[positions]
        return SparseFeatures(indptr, self.indices[positions], self.num_latents, values)

    def transpose(self) -> SparseFeatures:
        """The latent -> rows index (CSC of this CSR): "row" ``l`` of the result lists the rows where latent
        ``l`` is active, ascending. Built by scipy's counting sort in O(entries)."""
        import scipy.sparse

        small = self.nnz < 2**31 - 1 and self.n_rows < 2**31 - 1
        index_dtype = np.int32 if small else np.int64
        matrix = scipy.sparse.csr_array(
            (
                np.ones(self.nnz, dtype=bool),
                self.indices.astype(index_dtype, copy=False),
                self.indptr.astype(index_dtype),
            ),
            shape=(self.n_rows, self.num_latents),
        )
        transposed = matrix.tocsc()
        del matrix
        rows = transposed.indices.astype(np.int32, copy=False) if small else transposed.indices
        return SparseFeatures(transposed.indptr.astype(np.int64), rows, self.n_rows)

    def latent_frequencies(self) -> np.ndarray:
        """Number of rows in which each latent is active (``int64 [num_latents]``)."""
        return np.bincount(self.indices, minlength=self.num_latents)

    def covered(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask over latents: active in at least one of ``rows``."""
        mask = np.zeros(self.num_latents, dtype=bool)
        positions, _ = self.entry_positions(np.asarray(rows, dtype=np.int64))
        mask[self.indices[positions]] = True
        return mask

    def coverage_curve(self, rows: np.ndarray) -> np.ndarray:
        """Distinct latents covered by the first ``t`` of ``rows``, for ``t = 1..len(rows)`` (int64)."""
        rows = np.asarray(rows, dtype=np.int64)
        positions, segments = self.entry_positions(rows)
        first_rank = np.full(self.num_latents, len(rows), dtype=np.int64)
        np.minimum.at(first_rank, self.indices[positions], segments)
        newly_covered = np.bincount(first_rank[first_rank < len(rows)], minlength=len(rows))
        return np.cumsum(newly_covered)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        rows: list[list[int]] | list[np.ndarray],
        values: list[list[float]] | None = None,
        *,
        num_latents: int | None = None,
    ) -> SparseFeatures:
        """Build from Python lists (tests, small pools); rows are canonicalised like any input."""
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if len(rows) else np.zeros(0)
        flat_values = None
        if values is not None:
            flat_values = (
                np.concatenate([np.asarray(v, dtype=np.float32) for v in values])
                if len(values)
                else np.zeros(0, dtype=np.float32)
            )
        return _canonical(indptr, flat.astype(np.int64), flat_values, num_latents, source="lists")

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        indices_column: str = DEFAULT_FEATURES_COLUMN,
        values_column: str | None = None,
        *,
        num_latents: int | None = None,
    ) -> SparseFeatures:
        """Read a list-of-int column (and optionally an aligned list-of-float column) as CSR, via Arrow."""
        from hf_dataselect.data import require_columns

        require_columns(
            dataset, [c for c in (indices_column, values_column) if c], purpose="SAE feature selection"
        )
        indptr, indices = _list_column_buffers(dataset, indices_column, kind="integer")
        values = None
        if values_column is not None:
            value_indptr, values = _list_column_buffers(dataset, values_column, kind="floating")
            if not np.array_equal(value_indptr, indptr):
                bad = np.flatnonzero(np.diff(value_indptr) != np.diff(indptr))
                raise InputError(
                    f"Columns {indices_column!r} and {values_column!r} must have the same length in every "
                    f"row; they differ in {len(bad)} row(s), e.g. {bad[:5].tolist()}."
                )
        return _canonical(indptr, indices, values, num_latents, source=f"column {indices_column!r}")


def check_features_column(dataset: Dataset, column: str) -> None:
    """Cheap schema check (no data read): ``column`` must be a list of integers."""
    import pyarrow as pa

    arrow_type = dataset.features.arrow_schema.field(column).type
    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) or not pa.types.is_integer(
        arrow_type.value_type
    ):
        raise InputError(
            f"Column {column!r} must hold lists of active latent ids (integers), but it is {arrow_type}."
        )


def _list_column_buffers(dataset: Dataset, column: str, *, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr int64, flat values)`` of a list column without a per-row Python loop."""
    import pyarrow as pa

    chunked = dataset.with_format("arrow")[column]
    chunks = chunked.chunks if isinstance(chunked, pa.ChunkedArray) else [chunked]
    offsets_parts: list[np.ndarray] = []
    value_parts: list[np.ndarray] = []
    total = 0
    for chunk in chunks:
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):
            raise InputError(f"Column {column!r} must hold lists of numbers, but it is {chunk.type}.")
        value_type = chunk.type.value_type
        ok = pa.types.is_integer(value_type) if kind == "integer" else _is_number(value_type)
        if not ok:
            raise InputError(f"Column {column!r} must hold lists of {kind} numbers, but it is {chunk.type}.")
        if chunk.null_count:
            raise InputError(
                f"Column {column!r} has {chunk.null_count} missing row(s); every row needs a list."
            )
        offsets = chunk.offsets.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        child = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if child.null_count:
            raise InputError(f"Column {column!r} has missing values inside its lists.")
        value_parts.append(child.to_numpy(zero_copy_only=False))
        offsets_parts.append(offsets[1:] - offsets[0] + total if len(offsets_parts) else offsets - offsets[0])
        total += int(offsets[-1] - offsets[0])
    if not offsets_parts:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64 if kind == "integer" else np.float32)
    indptr = offsets_parts[0] if len(offsets_parts) == 1 else np.concatenate(offsets_parts)
    flat = value_parts[0] if len(value_parts) == 1 else np.concatenate(value_parts)
    return indptr, flat


def _is_number(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type)


def _canonical(
    indptr: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray | None,
    num_latents: int | None,
    *,
    source: str,
) -> SparseFeatures:
    """Check ids, cast to int32/float32, and sort/de-duplicate rows that are not strictly ascending."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows = len(indptr) - 1
    if len(indices):
        low, high = int(indices.min()), int(indices.max())
        if low < 0:
            raise InputError(f"Latent ids must be non-negative; {source} holds {low}.")
        if num_latents is not None and high >= num_latents:
            raise InputError(f"{source} holds latent id {high}, outside num_latents={num_latents}.")
        if high >= 2**31 - 1:
            raise InputError(f"{source} holds latent id {high}; ids must fit in int32.")
    else:
        high = -1
    if num_latents is None:
        num_latents = high + 1
    if values is not None:
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise InputError(f"The SAE activation values of {source} contain NaN or infinite numbers.")
    indices = indices.astype(np.int32, copy=False)
    if not _strictly_ascending_rows(indptr, indices):
        logger.info("%s: latent ids are not strictly ascending in every row; sorting them once.", source)
        indptr, indices, values = _sort_rows(indptr, indices, values, n_rows)
    return SparseFeatures(indptr, indices, int(num_latents), values)


def _strictly_ascending_rows(indptr: np.ndarray, indices: np.ndarray) -> bool:
    """Whether every row's ids are strictly ascending (checked in chunks to bound temporary memory)."""
    row_start = np.zeros(len(indices), dtype=bool) if len(indices) < _CHECK_CHUNK else None
    if row_start is not None:
        row_start[indptr[:-1][indptr[:-1] < len(indices)]] = True
        return bool(np.all((np.diff(indices) > 0) | row_start[1:]))
    starts = np.unique(indptr[:-1])
    for begin in range(1, len(indices), _CHECK_CHUNK):
        end = min(begin + _CHECK_CHUNK, len(indices))
        increasing = indices[begin:end] > indices[begin - 1 : end - 1]
        # entries that open a row need not exceed the previous row's last id
        opening = starts[(starts >= begin) & (starts < end)] - begin
        increasing[opening] = True
        if not increasing.all():
            return False
    return True


def _sort_rows(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray | None, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    # for a repeated latent, the largest value comes first and is the one kept
    order = np.lexsort((indices, rows)) if values is None else np.lexsort((-values, indices, rows))
    rows, indices = rows[order], indices[order]
    keep = np.ones(len(indices), dtype=bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (indices[1:] != indices[:-1])
    rows, indices = rows[keep], indices[keep]
    if values is not None:
        values = values[order][keep]
    new_indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=new_indptr[1:])
    return new_indptr, indices, values


# -- computing the columns when they are missing --------------------------------------------------------
@dataclass
class SAEFeatureOptions:
    """Options shared by the SAE selectors: where the features are, and how to compute them when absent."""

    features_column: str = DEFAULT_FEATURES_COLUMN
    """Column of active latent ids per row (``list<int32>``, ascending)."""
    sae: str = "auto"
    """SAE used when the features are computed: a local folder or Hub repo, or ``auto`` (train a small SAE
    on the pool)."""
    sae_model: str | None = None
    """Language model whose hidden states the SAE reads (``None``: the offline all-MiniLM-L6-v2)."""
    hookpoint: str | None = None
    """Module path (``model.layers.31``) or layer index of the SAE's input; ``None``: the SAE's own."""
    threshold: float | None = None
    """Activation above which a latent counts as active (absolute, in the SAE's units)."""
    threshold_quantile: float | None = None
    """Alternative to ``threshold``: this quantile of the non-zero activations (transfers between SAEs)."""
    num_latents: int | None = None
    """Size of the latent space; ``None``: the largest id present + 1."""

    def needs_sae_features(self, dataset: Dataset, *extra_columns: str) -> bool:
        return any(c not in dataset.column_names for c in (self.features_column, *extra_columns))

    def validate_sae_options(self, dataset: Dataset, context: SelectionContext, *extra_columns: str) -> None:
        """Cheap checks before any work: the feature column's type, or what computing it needs."""
        if self.threshold is not None and self.threshold_quantile is not None:
            raise InputError("Give threshold or threshold_quantile, not both.")
        if self.threshold_quantile is not None and not 0.0 < self.threshold_quantile < 1.0:
            raise InputError(f"threshold_quantile must be in (0, 1), got {self.threshold_quantile}.")
        if self.num_latents is not None and (isinstance(self.num_latents, bool) or self.num_latents < 1):
            raise InputError(f"num_latents must be a positive integer, got {self.num_latents!r}.")
        if not self.needs_sae_features(dataset, *extra_columns):
            check_features_column(dataset, self.features_column)
            return
        if self.features_column != DEFAULT_FEATURES_COLUMN:
            raise InputError(
                f"Column {self.features_column!r} not found. Computed features are written to "
                f"{DEFAULT_FEATURES_COLUMN!r}; leave features_column at its default to compute them."
            )
        if not self.sae:
            raise InputError("The pool has no SAE features and no sae= was given to compute them.")
        context.check_texts(dataset)

    def ensure_sae_features(
        self, dataset: Dataset, context: SelectionContext, *extra_columns: str
    ) -> Dataset:
        """The dataset with SAE feature columns, computed with ``add_sae_features`` when missing."""
        if not self.needs_sae_features(dataset, *extra_columns):
            return dataset
        from hf_dataselect.transforms.sae_features import add_sae_features

        row_format = context.row_format
        logger.info(
            "No %r column: computing SAE features of %d rows (sae=%s, model=%s, hookpoint=%s).",
            self.features_column,
            len(dataset),
            self.sae,
            self.sae_model or "the offline all-MiniLM-L6-v2",
            self.hookpoint,
        )
        return add_sae_features(
            dataset,
            model=self.sae_model,
            sae=self.sae,
            hookpoint=self.hookpoint,
            threshold=self.threshold,
            threshold_quantile=self.threshold_quantile,
            prompt_column=row_format.prompt_column if row_format.kind == "columns" else None,
            response_column=row_format.response_column if row_format.kind == "columns" else None,
            formatter=row_format.formatter,
        )

    def read_features(self, dataset: Dataset, values_column: str | None = None) -> SparseFeatures:
        return SparseFeatures.from_dataset(
            dataset, self.features_column, values_column, num_latents=self.num_latents
        )
