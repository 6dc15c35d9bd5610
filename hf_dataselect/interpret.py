"""What diversity did a selection buy? The SAE latents it covers that a random subset of the same size misses.

For a selection over a pool with SAE features, :func:`explain_coverage` draws a seeded random subset of the same
size, finds the latents active in the selection but in none of the random rows, and lists them (those active
in the most selected rows first) with the selected rows that activate each one most, as text snippets. SAE
latents have no names, so the snippets are what lets a person see what a latent stands for. The report is JSON
data (:meth:`CoverageReport.to_dict`) and markdown (:meth:`CoverageReport.to_markdown`);
:meth:`CoverageReport.save` writes both next to a saved selection::

    result = select(ds, "sae-greedy", budget=1000)
    path = result.save("out/")
    explain_selection(result).save(path)        # out/interpretation.md, out/interpretation.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from hf_dataselect.selection.result import SelectionResult
    from hf_dataselect.selection.sparse_features import SparseFeatures


@dataclass
class LatentExample:
    position: int
    activation: float | None
    snippet: str


@dataclass
class GainedLatent:
    latent: int
    selected_rows: int
    """Selected rows in which the latent is active."""
    pool_rows: int
    """Pool rows in which it is active."""
    examples: list[LatentExample] = field(default_factory=list)


@dataclass
class CoverageReport:
    method: str
    rows: int
    covered_by_selection: int
    covered_by_random: int
    gained: int
    """Latents the selection covers and the random subset misses."""
    lost: int
    """Latents the random subset covers and the selection misses."""
    active_in_pool: int
    seed: int
    latents: list[GainedLatent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# What `{self.method}` covers that a random subset misses",
            "",
            f"{self.rows} selected rows cover **{self.covered_by_selection}** SAE latents; a random subset of the "
            f"same size (seed {self.seed}) covers **{self.covered_by_random}** (of {self.active_in_pool} latents "
            f"active in the pool). The selection covers **{self.gained}** latents the random subset misses, and "
            f"misses {self.lost} that it covers.",
            "",
        ]
        if self.latents:
            lines += [
                f"The {len(self.latents)} gained latents active in the most selected rows, with the selected rows "
                "that activate them most:",
                "",
            ]
        for latent in self.latents:
            lines.append(
                f"## Latent {latent.latent} — in {latent.selected_rows} selected rows, "
                f"{latent.pool_rows} rows of the pool"
            )
            lines.append("")
            for example in latent.examples:
                value = "" if example.activation is None else f" (activation {example.activation:.3g})"
                snippet = example.snippet.replace("\n", " ").replace("|", "\\|")
                lines.append(f"- row {example.position}{value}: {snippet}")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def save(self, folder: str | os.PathLike, name: str = "interpretation") -> tuple[Path, Path]:
        """Write ``<name>.md`` and ``<name>.json`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        markdown = atomic.write_text(folder / f"{name}.md", self.to_markdown())
        return markdown, atomic.write_json(folder / f"{name}.json", self.to_dict())


def explain_coverage(
    features: SparseFeatures,
    positions: np.ndarray,
    texts: list[str] | None = None,
    *,
    method: str = "selection",
    seed: int = 0,
    top_latents: int = 20,
    examples_per_latent: int = 3,
    snippet_chars: int = 200,
) -> CoverageReport:
    """The latents covered by ``positions`` but not by a seeded random subset of the same size.

    ``texts`` (one per pool row) give the snippets; examples are the selected rows with the largest activation
    of the latent (``features.values``), or the earliest picks when the features carry no values.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        raise InputError("Cannot explain an empty selection.")
    if texts is not None and len(texts) != features.n_rows:
        raise InputError(f"texts has {len(texts)} entries but the pool has {features.n_rows} rows.")
    rng = np.random.default_rng([seed, 0x1A7E])
    random_rows = rng.choice(features.n_rows, size=len(positions), replace=False)
    selected_mask = features.covered(positions)
    random_mask = features.covered(random_rows)
    gained_mask = selected_mask & ~random_mask
    pool_counts = features.latent_frequencies()

    # the selected rows' entries, restricted to gained latents
    entry_positions, segments = features.entry_positions(positions)
    latents = features.indices[entry_positions]
    keep = gained_mask[latents]
    latents, segments = latents[keep], segments[keep]
    activations = features.values[entry_positions[keep]] if features.values is not None else None
    selected_counts = np.bincount(latents, minlength=features.num_latents)
    gained = np.flatnonzero(gained_mask)
    ranked = gained[np.lexsort((gained, pool_counts[gained], -selected_counts[gained]))][:top_latents]

    report = CoverageReport(
        method=method,
        rows=len(positions),
        covered_by_selection=int(selected_mask.sum()),
        covered_by_random=int(random_mask.sum()),
        gained=int(gained_mask.sum()),
        lost=int((random_mask & ~selected_mask).sum()),
        active_in_pool=int(np.count_nonzero(pool_counts)),
        seed=seed,
    )
    for latent in ranked.tolist():
        mine = latents == latent
        picks, values = segments[mine], activations[mine] if activations is not None else None
        order = np.lexsort((picks, -values)) if values is not None else np.argsort(picks, kind="stable")
        examples = []
        for k in order[:examples_per_latent]:
            position = int(positions[picks[k]])
            snippet = _snippet(texts[position], snippet_chars) if texts is not None else ""
            activation = float(values[k]) if values is not None else None
            examples.append(LatentExample(position, activation, snippet))
        report.latents.append(
            GainedLatent(latent, int(selected_counts[latent]), int(pool_counts[latent]), examples)
        )
    return report


def explain_selection(result: SelectionResult, **options: Any) -> CoverageReport:
    """:func:`explain_coverage` for a :class:`~hf_dataselect.selection.result.SelectionResult` whose pool has
    SAE features (``sae_indices``, and ``sae_values`` when present); snippets are the rows' prompt + response."""
    from hf_dataselect.formatting import RowFormat, join_parts
    from hf_dataselect.selection.sparse_features import (
        DEFAULT_FEATURES_COLUMN,
        DEFAULT_VALUES_COLUMN,
        SparseFeatures,
    )

    pool = result.pool
    column = str(result.options.get("features_column", DEFAULT_FEATURES_COLUMN))
    if column not in pool.column_names:
        raise InputError(
            f"The selection's pool has no {column!r} column: run an SAE method, or add SAE features "
            "(hf_dataselect.transforms.sae_features.add_sae_features) before selecting."
        )
    values = DEFAULT_VALUES_COLUMN if DEFAULT_VALUES_COLUMN in pool.column_names else None
    features = SparseFeatures.from_dataset(pool, column, values)
    text_columns = [c for c in (result.input_columns or pool.column_names) if c in pool.column_names]
    row_format = RowFormat.resolve(text_columns, **_format_options(result))
    texts = []
    for batch in pool.select_columns(text_columns).iter(batch_size=2048):
        prompts, responses = row_format.batch_prompt_response(batch)
        texts.extend(join_parts(p, r) for p, r in zip(prompts, responses, strict=True))
    return explain_coverage(
        features, result.positions, texts, method=result.method, seed=result.seed, **options
    )


def _format_options(result: SelectionResult) -> dict[str, Any]:
    described = result.row_format or {}
    if described.get("kind") == "columns":
        return {
            "prompt_column": described.get("prompt_column"),
            "response_column": described.get("response_column"),
        }
    return {}


def _snippet(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"
