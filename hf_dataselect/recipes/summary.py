"""The run's summary: ``summary.json`` and a Markdown table ``summary.md``, one row per grid cell."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect import atomic

if TYPE_CHECKING:
    from hf_dataselect.recipes.pipeline import RunOutcome


def write_summary(out: Path, outcomes: Sequence[RunOutcome], base: dict[str, Any] | None) -> None:
    """``summary.json`` and a Markdown table ``summary.md`` with one row per run."""
    rows = [o.summary_row() for o in outcomes]
    atomic.write_json(out / "summary.json", {"base_model": base, "runs": rows}, default=str)
    eval_names = sorted({k[: -len("_macro_loss")] for row in rows for k in row if k.endswith("_macro_loss")})
    header = ["run", "rows", "selection s", "train s", "train loss"]
    header += [f"{name} macro loss" for name in eval_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if base:
        cells = ["base model (not fine-tuned)", "", "", "", ""]
        cells += [_fmt(base.get(name, {}).get("macro_loss")) for name in eval_names]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        cells = [
            row["run"],
            _fmt(row["rows"]),
            _fmt(row["selection_seconds"], 1),
            _fmt(row["train_seconds"], 1),
            _fmt(row["train_loss"]),
        ]
        cells += [_fmt(row.get(f"{name}_macro_loss")) for name in eval_names]
        lines.append("| " + " | ".join(cells) + " |")
    atomic.write_text(out / "summary.md", "\n".join(lines) + "\n")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
