"""Figures saved with a selection, drawn from the facts its method recorded in ``info``.

* ``cluster_sizes.png`` — rows per cluster in the pool against rows selected from it (kMQ and friends):
  proportional allocation puts every cluster on the dashed line.
* ``coverage_curve.png`` — features covered against rows selected (SAE selectors record the curve).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hf_dataselect.selection.result import SelectionResult


def write_figures(result: SelectionResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    written = []
    if result.info.get("cluster_sizes") is not None:
        written.append(_cluster_sizes(result, folder / "cluster_sizes.png"))
    if result.info.get("coverage_curve") is not None:
        written.append(_coverage_curve(result, folder / "coverage_curve.png"))
    return written


def _cluster_sizes(result: SelectionResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    sizes = np.asarray(result.info["cluster_sizes"])
    picked = np.asarray(result.info["selected_per_cluster"])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(sizes, picked, s=14, alpha=0.7, label="clusters")
    line = np.linspace(0, sizes.max(), 50)
    ax.plot(line, line * picked.sum() / sizes.sum(), "--", color="grey", label="proportional share")
    ax.set_xlabel("rows in the pool")
    ax.set_ylabel("rows selected")
    ax.set_title(f"{result.method}: {len(sizes)} clusters, {picked.sum()} of {sizes.sum()} rows")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _coverage_curve(result: SelectionResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    curve = np.asarray(result.info["coverage_curve"], dtype=np.float64)
    rows = np.asarray(result.info.get("coverage_curve_rows", np.arange(1, len(curve) + 1)))
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.plot(rows, curve, label=result.method)
    reference = result.info.get("coverage_curve_random")
    if reference is not None:
        ax.plot(rows, np.asarray(reference), "--", color="grey", label="random (same budget)")
    ax.set_xlabel("rows selected")
    ax.set_ylabel("features covered")
    ax.set_title(f"{result.method}: feature coverage")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
