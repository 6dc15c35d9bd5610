"""``hf-dataselect select``: pick a subset of an instruction pool and save it with its manifest and figures."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_dataselect.commands._parser import make_parser, parse_budget, parse_option_pairs
from hf_dataselect.commands._pool import PoolArguments, positional_data

logger = logging.getLogger("hf_dataselect")

METHODS_HELP = (
    "Selection method: random, longest, kcenter, kmq, kmq-random, kmq-closest, sae-greedy, sae-simscale, "
    "deita, perplexity, iterative-kmq (see the README for what each does)."
)


@dataclass
class SelectArguments:
    """What to select and where to write it."""

    method: str = field(default="kmq", metadata={"help": METHODS_HELP})
    budget: str = field(
        default="0.1", metadata={"help": "Rows to select: a count (1000) or a fraction of the pool (0.05)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Random seed; the same inputs and seed give the same rows."}
    )
    output: str = field(
        default="selection",
        metadata={"help": "Folder for selected.jsonl, selected/ (Arrow), manifest.json and figures."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace the output folder if it is not empty."})
    no_figures: bool = field(default=False, metadata={"help": "Do not draw PNG figures."})
    k: int | None = field(
        default=None, metadata={"help": "kMQ: number of clusters (default: chosen by silhouette)."}
    )
    quality_column: str | None = field(
        default=None, metadata={"help": "kMQ/Deita: numeric quality column (higher is better)."}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "kMQ: sampling temperature T in exp(q/T)."}
    )
    embedding_model: str | None = field(
        default=None,
        metadata={
            "help": "Encoder for embeddings when the pool has none (default: the offline all-MiniLM-L6-v2)."
        },
    )
    sae: str | None = field(
        default=None,
        metadata={"help": "SAE methods: SAE folder or Hub repo, or 'auto' to train a small SAE on the pool."},
    )
    sae_model: str | None = field(
        default=None, metadata={"help": "SAE methods: the language model the SAE reads (default: MiniLM)."}
    )
    hookpoint: str | None = field(
        default=None,
        metadata={"help": "SAE methods: module path (model.layers.12) or layer index of the SAE."},
    )
    threshold: float | None = field(
        default=None,
        metadata={"help": "SAE methods: activation threshold τ for a latent to count as active."},
    )
    option: list[str] | None = field(
        default=None,
        metadata={
            "help": "Any other method option as key=value, e.g. --option kmeans_niter=30 variant=closest."
        },
    )

    def method_options(self) -> dict[str, Any]:
        named = {
            "k": self.k,
            "quality_column": self.quality_column,
            "temperature": self.temperature,
            "embedding_model": self.embedding_model,
            "sae": self.sae,
            "sae_model": self.sae_model,
            "hookpoint": _int_or_str(self.hookpoint),
            "threshold": self.threshold,
        }
        options = {key: value for key, value in named.items() if value is not None}
        options.update(parse_option_pairs(self.option))
        return options


def _int_or_str(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def build_parser():
    return make_parser("select", __doc__.split(":", 1)[1].strip(), [PoolArguments, SelectArguments])


def main(argv: Sequence[str]) -> int:
    from hf_dataselect.errors import InputError
    from hf_dataselect.selection import select
    from hf_dataselect.selection.base import make_selector

    pool_args, args = build_parser().parse_with_config(positional_data(list(argv)))
    started = time.perf_counter()
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise InputError(
            f"{output} already exists and is not empty; pass --overwrite or choose another --output."
        )
    budget = parse_budget(args.budget)
    options = args.method_options()
    make_selector(args.method, options)  # unknown method or option: fail before loading anything

    pool = pool_args.load()
    logger.info("Pool: %s (%d rows, columns %s).", pool_args.describe(), len(pool), pool.column_names)
    result = select(pool, args.method, budget, seed=args.seed, **pool_args.select_kwargs(), **options)
    result.save(output, overwrite=args.overwrite, figures=not args.no_figures)
    print_summary(result.summary(), output, time.perf_counter() - started)
    return 0


def print_summary(summary: dict[str, Any], output: Path, seconds: float) -> None:
    lines = [
        f"method        {summary['method']}",
        f"rows in       {summary['rows_in']}",
        f"rows out      {summary['rows_out']}",
    ]
    if "clusters" in summary:
        lines.append(f"clusters      {summary['clusters']} ({summary['clusters_selected']} represented)")
    lines += [
        f"time          {seconds:.1f} s (selection {summary['seconds']:.1f} s)",
        f"output        {output}/",
    ]
    print("\n".join(lines))
