"""``SelectionResult``: what a selection returns, and how it is saved.

A result holds enough to reproduce, explain and share the selection: positions and stable row ids, per-row
scores, the method, options and seed, the input's fingerprint and the library version. ``save(dir)`` writes

* ``selected.jsonl`` — the selected rows (input columns; vectors and SAE features left out) with their
  ``_row_id`` and ``_rank``;
* ``selected/`` — the selected rows with every column, as an Arrow dataset (``datasets.load_from_disk``);
* ``manifest.json`` — method, options, seed, fingerprint, version, timing, method facts and per-row scores;
* figures (``cluster_sizes.png``, ``coverage_curve.png`` ...) when the method has something to plot;
* artifacts such as ``centroids.safetensors``.

Everything is written to a temporary folder next to ``output_dir`` and renamed into place at the end, so an
error never leaves a half-written folder behind and an existing folder is only replaced on success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")

ID_COLUMNS = ("id", "row_id", "_row_id", "uid", "idx")
# computed per-row features that are too bulky for the JSONL copy of the selected rows
BULKY_COLUMNS = ("embedding", "sae_indices", "sae_values")


@dataclass
class SelectionResult:
    """The outcome of :func:`hf_dataselect.select`."""

    method: str
    budget: int
    seed: int
    positions: np.ndarray
    """Selected positions in the input dataset, in the method's pick order."""
    scores: dict[str, np.ndarray]
    """Per selected row, aligned with ``positions``."""
    options: dict[str, Any]
    info: dict[str, Any]
    input_fingerprint: str
    input_rows: int
    library_version: str
    elapsed_seconds: float
    pool: Dataset = field(repr=False)
    """The input dataset plus every column computed for the selection (embedding, cluster, ...)."""
    input_columns: list[str] = field(default_factory=list, repr=False)
    row_format: dict[str, Any] | None = None
    id_column: str | None = None
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def dataset(self) -> Dataset:
        """The selected rows (all columns of the pool), in pick order."""
        return self.pool.select(self.positions)

    @property
    def row_ids(self) -> list[str]:
        """Stable ids of the selected rows.

        The values of an id column (``id``, ``row_id``, ``uid``, ``idx`` or the one given) when the pool has
        one; otherwise a content hash of the row's input columns, so the id survives reordering and
        re-loading. Exact duplicate rows among the selection get a ``-2``, ``-3`` ... suffix.
        """
        if self.id_column is not None:
            return [str(v) for v in self.pool.select(self.positions)[self.id_column]]
        subset = self.pool.select(self.positions).select_columns(self.input_columns or self.pool.column_names)
        ids, seen = [], {}
        for row in subset:
            digest = hashlib.blake2b(
                json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode(), digest_size=8
            ).hexdigest()
            seen[digest] = seen.get(digest, 0) + 1
            ids.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
        return ids

    def summary(self) -> dict[str, Any]:
        """Short facts for logs and the CLI: rows in/out, clusters, time."""
        out: dict[str, Any] = {
            "method": self.method,
            "rows_in": self.input_rows,
            "rows_out": len(self.positions),
            "seconds": round(self.elapsed_seconds, 2),
        }
        sizes = self.info.get("cluster_sizes")
        if sizes is not None:
            out["clusters"] = len(sizes)
            out["clusters_selected"] = int(np.count_nonzero(self.info["selected_per_cluster"]))
        return out

    def manifest(self) -> dict[str, Any]:
        """Everything needed to reproduce and explain the selection, as JSON-ready data."""
        row_ids = self.row_ids
        rows = []
        for rank, position in enumerate(self.positions.tolist()):
            entry = {"rank": rank, "position": int(position), "row_id": row_ids[rank]}
            entry.update({name: _plain(values[rank]) for name, values in self.scores.items()})
            rows.append(entry)
        return {
            "library": "hf_dataselect",
            "library_version": self.library_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": self.method,
            "budget": self.budget,
            "seed": self.seed,
            "options": _plain(self.options),
            "input": {
                "fingerprint": self.input_fingerprint,
                "rows": self.input_rows,
                "columns": self.input_columns,
                "row_format": self.row_format,
                "id_column": self.id_column,
            },
            "summary": self.summary(),
            "info": _plain(self.info),
            "selection": rows,
        }

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False, figures: bool = True) -> Path:
        """Write the selection to ``output_dir`` (see the module docstring); returns the folder."""
        target = Path(output_dir)
        if target.exists() and not target.is_dir():
            raise InputError(f"{target} exists and is not a folder.")
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise InputError(
                f"{target} already exists and is not empty; pass overwrite=True (CLI: --overwrite)."
            )
        with atomic.staging_folder(target) as staging:
            self._write(staging, figures=figures)
        logger.info("Saved the selection to %s.", target)
        return target

    def _write(self, folder: Path, *, figures: bool) -> None:
        subset = self.dataset
        subset.save_to_disk(str(folder / "selected"))
        light = [c for c in subset.column_names if c not in BULKY_COLUMNS]
        ranked = subset.select_columns(light).add_column("_rank", list(range(len(subset))))
        ranked = ranked.add_column("_row_id", self.row_ids)
        ranked.to_json(str(folder / "selected.jsonl"), lines=True, force_ascii=False)
        (folder / "manifest.json").write_text(
            json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n"
        )
        for name, artifact in self.artifacts.items():
            artifact.save(folder / name)
        if figures:
            from hf_dataselect.selection.report import write_figures

            write_figures(self, folder)


def _plain(value: Any) -> Any:
    """numpy and other values -> JSON-serialisable Python values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def find_id_column(column_names: Sequence[str], requested: str | None) -> str | None:
    if requested is not None:
        if requested not in column_names:
            raise InputError(f"id_column {requested!r} not found; the dataset has {list(column_names)}.")
        return requested
    return next((c for c in ID_COLUMNS if c in column_names), None)
