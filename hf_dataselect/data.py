"""Reading pools (local files, ``save_to_disk`` folders, Hub datasets) and reading their columns as arrays.

The column readers go through Arrow, not Python lists: a million 384-d embeddings become one float32 matrix
without a per-row loop, and an index mapping left by ``.select``/``.shuffle`` is honoured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dataselect.formatting import RowFormat

logger = logging.getLogger(__name__)

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


def load_pool(
    data: str | os.PathLike,
    *,
    split: str | None = None,
    config: str | None = None,
    max_rows: int | None = None,
) -> Dataset:
    """Load an instruction pool as a :class:`datasets.Dataset`.

    ``data`` is a local JSON/JSONL/CSV/TSV/Parquet/Arrow file, a folder written by ``save_to_disk``
    (a ``Dataset`` or a ``DatasetDict`` with ``split``), a folder of such files, or a Hub dataset id
    (``config`` and ``split`` as in :func:`datasets.load_dataset`; the default split is ``train``).
    """
    import datasets

    path = Path(data)
    if path.is_file():
        builder = FILE_BUILDERS.get("".join(path.suffixes[-2:]).lower()) or FILE_BUILDERS.get(
            path.suffix.lower()
        )
        if builder is None:
            raise InputError(
                f"Unknown file type {path.suffix!r} for {path}; supported: {sorted(set(FILE_BUILDERS))}."
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as err:  # datasets raises many types for malformed files
            raise InputError(f"Could not read {path} as {builder}: {err}") from err
    elif path.is_dir():
        dataset = _load_folder(path, split)
    elif _looks_like_local_path(str(data)):
        raise InputError(f"No such file or folder: {path}")
    else:
        try:
            dataset = datasets.load_dataset(str(data), config, split=split or "train")
        except Exception as err:
            raise InputError(
                f"Could not load {str(data)!r} from the Hugging Face Hub (config={config!r}, "
                f"split={split or 'train'!r}): {err}"
            ) from err
    if len(dataset) == 0:
        raise InputError(f"The pool {data} has no rows.")
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.select(range(max_rows))
    return dataset


def _load_folder(path: Path, split: str | None) -> Dataset:
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            chosen = split or ("train" if "train" in loaded else None)
            if chosen not in loaded:
                raise InputError(f"{path} holds splits {list(loaded)}; choose one with split=/--split.")
            return loaded[chosen]
        return loaded
    try:
        loaded = datasets.load_dataset(str(path), split=split or "train")
    except Exception as err:
        raise InputError(f"Could not read the folder {path} as a dataset: {err}") from err
    return loaded


def _looks_like_local_path(data: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else that does not exist is a missing local path."""
    if data.startswith((".", "/", "~")) or os.sep in data.replace("/", "", 1) or data.count("/") > 1:
        return True
    return Path(data).suffix.lower() in FILE_BUILDERS


# -- columns as arrays ----------------------------------------------------------------------------------
def require_columns(dataset: Dataset, columns: Sequence[str], *, purpose: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise InputError(f"{purpose} needs column(s) {missing}; the dataset has {dataset.column_names}.")


def matrix_column(dataset: Dataset, column: str) -> np.ndarray:
    """A list-of-floats column as a ``[rows, dim]`` float32 matrix; rejects ragged rows and NaN/inf."""
    import pyarrow as pa
    import pyarrow.compute as pc

    require_columns(dataset, [column], purpose="Reading vectors")
    chunked = dataset.with_format("arrow")[column]
    array = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
    if array.null_count:
        raise InputError(f"Column {column!r} has {array.null_count} missing vector(s).")
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
        values = array.flatten()
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise InputError(
                f"Column {column!r} holds vectors of different lengths ({lengths.min()}..{lengths.max()})."
            )
        dim = int(lengths[0]) if len(lengths) else 0
        values = array.flatten()
    else:
        raise InputError(f"Column {column!r} is {array.type}, not a list of numbers.")
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(array), dim)
    if not all_finite(matrix):
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        raise InputError(
            f"Column {column!r} has NaN or infinite values in {len(bad)} row(s), e.g. {bad[:5].tolist()}."
        )
    return matrix


def all_finite(matrix: np.ndarray, rows_per_chunk: int = 65536) -> bool:
    """``np.isfinite(matrix).all()`` without a full-size boolean temporary (384 MB for 1M × 384)."""
    return all(
        np.isfinite(matrix[i : i + rows_per_chunk]).all() for i in range(0, len(matrix), rows_per_chunk)
    )


def numeric_column(dataset: Dataset, column: str, *, purpose: str) -> np.ndarray:
    """A numeric column as float64; a clear error for strings, missing values or NaN."""
    import pyarrow as pa

    require_columns(dataset, [column], purpose=purpose)
    chunked = dataset.with_format("arrow")[column]
    array = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
    if not (
        pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)
    ):
        raise InputError(f"{purpose}: column {column!r} must be numeric, but it holds {array.type}.")
    if array.null_count:
        raise InputError(f"{purpose}: column {column!r} has {array.null_count} missing value(s).")
    values = array.to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise InputError(
            f"{purpose}: column {column!r} has NaN or infinite values at row(s) {bad[:5].tolist()}."
        )
    return values


def pool_prompt_response(
    dataset: Dataset, row_format: RowFormat, *, batch_size: int = 2048
) -> tuple[list[str], list[str]]:
    """Prompts and responses of every row, reading only the columns the format needs."""
    needed = [c for c in (row_format.prompt_column, row_format.response_column, row_format.input_column) if c]
    view = dataset.select_columns(needed) if needed and row_format.kind != "callable" else dataset
    prompts: list[str] = []
    responses: list[str] = []
    for batch in view.iter(batch_size=batch_size):
        p, r = row_format.batch_prompt_response(batch)
        prompts.extend(p)
        responses.extend(r)
    return prompts, responses
