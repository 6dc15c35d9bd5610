"""``hf-dataselect compare``: run several selectors on one pool and compare what they select.

    hf-dataselect compare                                   # demo pool, label = its hidden `task` column
    hf-dataselect compare data.jsonl --methods random,longest,kmq,sae-greedy --budget 0.05 \\
        --label-column source --output cmp/

Shared columns are computed once for every method: embeddings (MiniLM unless ``--embedding-model``), SAE
features when an SAE method is compared (or the pool already has them), and a reference k-means clustering for
the cluster-coverage measure. ``--cache-dir`` keeps the pool with those columns on disk, so a second run with
the same pool and settings skips them. The label column (and ``--hide-columns``) are removed before any
selector sees the pool.

Per method: seconds, rows, feature coverage, cluster coverage, label coverage and entropy, exact- and
near-duplicate shares, mean length in tokens (see :mod:`hf_dataselect.metrics`). Written to ``--output``:
``compare.json``, ``compare.md`` (the table), ``coverage_curves.png``, ``label_distribution.png``,
``summary.png``; with ``--save-selections`` each selection's folder, with ``--interpret`` each SAE-featured
selection's ``interpretation.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.commands._parser import make_parser, parse_budget
from hf_dataselect.commands._pool import PoolArguments, positional_data
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect")

DEFAULT_METHODS = "random,longest,kcenter,kmq,sae-greedy,sae-simscale"
DEMO_LABELS = ("task", "family", "is_near_duplicate", "is_low_quality")
SAE_METHODS = ("sae-greedy", "sae-simscale")


@dataclass
class CompareArguments:
    """Which selectors to compare, on what budget, and against which hidden label."""

    methods: str = field(
        default=DEFAULT_METHODS, metadata={"help": "Comma-separated selection methods to compare."}
    )
    budget: str = field(
        default="0.05", metadata={"help": "Rows per method: a count (1000) or a fraction of the pool (0.05)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every method (and of the random references)."})
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Hidden label to score coverage against (e.g. a source or task column); removed from the "
            "pool before selection. Default: 'task' on the demo pool, none otherwise."
        },
    )
    hide_columns: list[str] | None = field(
        default=None,
        metadata={"help": "More columns to remove before selection (the demo's labels always are)."},
    )
    output: str = field(
        default="comparison", metadata={"help": "Folder for compare.json, compare.md, figures."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace the output folder if it is not empty."})
    quality_column: str | None = field(
        default=None, metadata={"help": "Quality column for the methods that take one (kmq, deita)."}
    )
    embedding_model: str | None = field(
        default=None, metadata={"help": "Encoder of the shared embeddings (default: the offline MiniLM)."}
    )
    clusters: int | None = field(
        default=None,
        metadata={"help": "k of the reference clustering for cluster coverage (default: √(n/2), 2..500)."},
    )
    near_duplicate_threshold: float = field(
        default=0.95,
        metadata={"help": "Cosine similarity at which two selected rows count as near-duplicates."},
    )
    sae: str | None = field(
        default=None,
        metadata={"help": "SAE for the shared SAE features: folder, Hub repo, or 'auto' (default)."},
    )
    sae_model: str | None = field(default=None, metadata={"help": "Model the SAE reads (default: MiniLM)."})
    hookpoint: str | None = field(
        default=None, metadata={"help": "SAE hookpoint (module path or layer index)."}
    )
    threshold: float | None = field(default=None, metadata={"help": "SAE activation threshold τ."})
    threshold_quantile: float | None = field(
        default=None, metadata={"help": "τ as a quantile of the SAE's non-zero activations."}
    )
    option: list[str] | None = field(
        default=None,
        metadata={
            "help": "A method's option as METHOD:key=value, e.g. --option kmq:k=20 sae-simscale:delta=0.4."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Keep the pool with its computed columns here and reuse it on the next run."},
    )
    save_selections: bool = field(default=False, metadata={"help": "Also save every selection's folder."})
    interpret: bool = field(
        default=False, metadata={"help": "Write interpretation.md (latents gained over random) per method."}
    )
    no_figures: bool = field(default=False, metadata={"help": "Do not draw PNG figures."})

    def method_list(self) -> list[str]:
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not methods:
            raise InputError("--methods is empty.")
        if len(set(methods)) != len(methods):
            raise InputError(f"--methods lists a method twice: {methods}.")
        return methods

    def per_method_options(self, methods: list[str]) -> dict[str, dict[str, Any]]:
        """Options for each method: the shared flags a method accepts, then its ``--option`` entries."""
        import yaml

        from hf_dataselect.selection.base import method_option_names

        shared = {
            "quality_column": self.quality_column,
            "embedding_model": self.embedding_model,
            "sae": self.sae,
            "sae_model": self.sae_model,
            "hookpoint": _int_or_str(self.hookpoint),
            "threshold": self.threshold,
            "threshold_quantile": self.threshold_quantile,
        }
        options: dict[str, dict[str, Any]] = {}
        for method in methods:
            accepted = method_option_names(method)
            options[method] = {k: v for k, v in shared.items() if v is not None and k in accepted}
        for entry in self.option or []:
            method, sep, pair = entry.partition(":")
            key, eq, value = pair.partition("=")
            if not sep or not eq or not key:
                raise InputError(f"--option expects METHOD:key=value, got {entry!r}.")
            if method not in options:
                raise InputError(f"--option {entry!r} names {method!r}, which is not in --methods {methods}.")
            options[method][key.strip().replace("-", "_")] = yaml.safe_load(value)
        return options


def _int_or_str(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def build_parser():
    return make_parser(
        "compare", __doc__.split(":", 1)[1].split("\n")[0].strip(), [PoolArguments, CompareArguments]
    )


def main(argv: Sequence[str]) -> int:
    from hf_dataselect.selection.base import make_selector, resolve_budget

    pool_args, args = build_parser().parse_with_config(positional_data(list(argv)))
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise InputError(
            f"{output} already exists and is not empty; pass --overwrite or choose another --output."
        )
    if not 0 < args.near_duplicate_threshold <= 1:
        raise InputError(
            f"--near-duplicate-threshold must be in (0, 1], got {args.near_duplicate_threshold}."
        )
    methods = args.method_list()
    options = args.per_method_options(methods)
    selectors = {method: make_selector(method, options[method]) for method in methods}  # typos fail here
    budget = parse_budget(args.budget)

    pool = pool_args.load()
    demo = pool_args.data is None
    label_column = args.label_column or ("task" if demo and "task" in pool.column_names else None)
    hidden = _hidden_columns(pool, label_column, args.hide_columns, demo)
    rows = resolve_budget(budget, len(pool))
    _validate_upfront(pool, hidden, selectors, rows, args.seed, pool_args)
    logger.info(
        "Pool: %s (%d rows); comparing %s at %d rows each.", pool_args.describe(), len(pool), methods, rows
    )

    pool = prepare_pool(pool, args, pool_args, need_sae=any(m in SAE_METHODS for m in methods))
    comparison = run_comparison(pool, methods, options, rows, args, pool_args, label_column, hidden)
    write_outputs(comparison, output, args)
    print(format_table(comparison))
    print(f"\nwritten to {output}/")
    return 0


def _hidden_columns(
    pool: Dataset, label_column: str | None, extra: list[str] | None, demo: bool
) -> list[str]:
    hidden = list(extra or [])
    if label_column is not None:
        if label_column not in pool.column_names:
            raise InputError(f"--label-column {label_column!r} not found; the pool has {pool.column_names}.")
        hidden.append(label_column)
    if demo:
        hidden += [c for c in DEMO_LABELS if c in pool.column_names]
    missing = [c for c in hidden if c not in pool.column_names]
    if missing:
        raise InputError(f"--hide-columns {missing} not found; the pool has {pool.column_names}.")
    return sorted(set(hidden))


def _validate_upfront(pool, hidden, selectors, rows, seed, pool_args) -> None:
    """Every method's cheap checks before anything is computed (a missing quality column fails here)."""
    from hf_dataselect.selection.base import SelectionContext

    view = pool.remove_columns(hidden) if hidden else pool
    for selector in selectors.values():
        context = SelectionContext(
            seed=seed,
            column_names=list(view.column_names),
            prompt_column=pool_args.prompt_column,
            response_column=pool_args.response_column,
        )
        selector.validate(view, rows, context)


# -- shared columns -------------------------------------------------------------------------------------------
def prepare_pool(
    pool: Dataset, args: CompareArguments, pool_args: PoolArguments, *, need_sae: bool
) -> Dataset:
    """The pool with ``embedding`` (always) and SAE features (when needed), cached in ``--cache-dir``."""
    cache = _cache_folder(pool, args, need_sae)
    if cache is not None and (cache / "dataset_info.json").exists():
        import datasets

        logger.info("Reusing the pool with computed columns from %s.", cache)
        return datasets.load_from_disk(str(cache))
    from hf_dataselect.formatting import RowFormat
    from hf_dataselect.transforms.embed import Embeddings

    row_format = RowFormat.resolve(
        pool.column_names, prompt_column=pool_args.prompt_column, response_column=pool_args.response_column
    )
    columns = row_format.kind == "columns"
    if "embedding" not in pool.column_names:
        logger.info("Embedding %d rows once for every method.", len(pool))
        pool = pool.map(
            Embeddings(
                model=args.embedding_model,
                prompt_column=row_format.prompt_column if columns else None,
                response_column=row_format.response_column if columns else None,
            ),
            batched=True,
            batch_size=1000,
            desc="Embedding rows",
        )
    if need_sae and "sae_indices" not in pool.column_names:
        from hf_dataselect.transforms.sae_features import add_sae_features

        logger.info("Computing SAE features of %d rows once for every method.", len(pool))
        sae_options = {
            "model": args.sae_model,
            "sae": args.sae or "auto",
            "hookpoint": _int_or_str(args.hookpoint),
            "threshold": args.threshold,
            "threshold_quantile": args.threshold_quantile,
            "prompt_column": row_format.prompt_column if columns else None,
            "response_column": row_format.response_column if columns else None,
        }
        pool = add_sae_features(pool, **{k: v for k, v in sae_options.items() if v is not None})
    if cache is not None:
        with atomic.staging_folder(cache) as staging:
            pool.save_to_disk(str(staging))
        import datasets

        pool = datasets.load_from_disk(str(cache))
    return pool


def _cache_folder(pool: Dataset, args: CompareArguments, need_sae: bool) -> Path | None:
    if args.cache_dir is None:
        return None
    key = json.dumps(
        {
            "fingerprint": getattr(pool, "_fingerprint", ""),
            "rows": len(pool),
            "embedding_model": args.embedding_model,
            "sae": [
                args.sae or "auto",
                args.sae_model,
                args.hookpoint,
                args.threshold,
                args.threshold_quantile,
            ]
            if need_sae
            else None,
        },
        sort_keys=True,
    )
    return Path(args.cache_dir) / f"pool-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def token_lengths(texts: list[str]) -> np.ndarray:
    """Tokens per text with the offline MiniLM tokenizer (no truncation)."""
    from hf_dataselect.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), 4096):
        encoded = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
        lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
    return lengths


# -- running and measuring ------------------------------------------------------------------------------------
@dataclass
class Comparison:
    pool_rows: int
    budget: int
    seed: int
    label_column: str | None
    methods: dict[str, dict[str, Any]]
    curves: dict[str, np.ndarray]
    label_counts: dict[str, dict[str, int]]
    pool_label_counts: dict[str, int] | None
    pool_facts: dict[str, Any]


def run_comparison(
    pool: Dataset,
    methods: list[str],
    options: dict[str, dict[str, Any]],
    rows: int,
    args: CompareArguments,
    pool_args: PoolArguments,
    label_column: str | None,
    hidden: list[str],
) -> Comparison:
    from collections import Counter

    from hf_dataselect import metrics
    from hf_dataselect.cluster import fit_kmeans
    from hf_dataselect.data import matrix_column, pool_prompt_response
    from hf_dataselect.formatting import RowFormat, join_parts
    from hf_dataselect.selection import select
    from hf_dataselect.selection.sparse_features import SparseFeatures

    row_format = RowFormat.resolve(
        [c for c in pool.column_names if c not in hidden],
        prompt_column=pool_args.prompt_column,
        response_column=pool_args.response_column,
    )
    prompts, responses = pool_prompt_response(pool, row_format)
    texts = [join_parts(p, r) for p, r in zip(prompts, responses, strict=True)]
    lengths = token_lengths(texts)
    embeddings = matrix_column(pool, "embedding")
    k = args.clusters or int(np.clip(round(np.sqrt(len(pool) / 2)), 2, 500))
    k = min(k, len(pool))
    reference = fit_kmeans(embeddings, k, seed=args.seed)
    features = None
    pool_facts: dict[str, Any] = {"reference_clusters": k}
    if "sae_indices" in pool.column_names:
        values = "sae_values" if "sae_values" in pool.column_names else None
        features = SparseFeatures.from_dataset(pool, "sae_indices", values)
        pool_facts["sae_latents_active"] = int(np.count_nonzero(features.latent_frequencies()))
        pool_facts["pearson_r_n_active_vs_tokens"] = metrics.pearson_r(features.sizes, lengths)
    labels = list(pool[label_column]) if label_column else None
    selection_pool = pool.remove_columns(hidden) if hidden else pool

    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, np.ndarray] = {}
    label_counts: dict[str, dict[str, int]] = {}
    for method in methods:
        started = time.perf_counter()
        result = select(
            selection_pool,
            method,
            rows,
            seed=args.seed,
            prompt_column=pool_args.prompt_column,
            response_column=pool_args.response_column,
            id_column=pool_args.id_column,
            **options[method],
        )
        seconds = time.perf_counter() - started
        positions = result.positions
        measured = metrics.selection_metrics(
            positions,
            features=features,
            clusters=reference.labels,
            labels=labels,
            texts=texts,
            embeddings=embeddings,
            lengths=lengths,
            near_duplicate_threshold=args.near_duplicate_threshold,
        )
        measured["seconds"] = seconds
        if "labels" in measured:
            label_counts[method] = measured["labels"].pop("counts")
        if features is not None:
            curves[method] = features.coverage_curve(positions)
        results[method] = measured
        logger.info("%s: %d rows in %.1f s.", method, len(positions), seconds)
        if args.save_selections:
            result.save(
                Path(args.output) / "selections" / method, overwrite=True, figures=not args.no_figures
            )
        if args.interpret and features is not None:
            from hf_dataselect.interpret import explain_coverage

            report = explain_coverage(features, positions, texts, method=method, seed=args.seed)
            report.save(Path(args.output) / "interpretation", name=method)
    pool_label_counts = dict(Counter(labels)) if labels is not None else None
    return Comparison(
        len(pool), rows, args.seed, label_column, results, curves, label_counts, pool_label_counts, pool_facts
    )


# -- reporting ---------------------------------------------------------------------------------------------
_COLUMNS = (
    ("method", "{}"),
    ("rows", "{}"),
    ("seconds", "{:.1f}"),
    ("features", "{}"),
    ("clusters", "{}"),
    ("labels", "{}"),
    ("entropy", "{}"),
    ("near-dup", "{}"),
    ("exact-dup", "{}"),
    ("mean tok", "{:.0f}"),
)


def table_rows(comparison: Comparison) -> list[list[str]]:
    rows = []
    for method, m in comparison.methods.items():
        feature = m.get("feature_coverage")
        cluster = m["cluster_coverage"]
        label = m.get("labels")
        rows.append(
            [
                method,
                str(m["rows"]),
                f"{m['seconds']:.1f}",
                f"{feature['covered']} ({feature['share']:.1%})" if feature else "–",
                f"{cluster['covered']}/{cluster['total']}",
                f"{label['covered']}/{label['total']}" if label else "–",
                f"{label['entropy_bits']:.2f} ({label['normalized_entropy']:.2f})" if label else "–",
                f"{m['near_duplicate_share']:.1%}",
                f"{m['exact_duplicate_share']:.1%}",
                f"{m['mean_tokens']:.0f}",
            ]
        )
    return rows


def format_table(comparison: Comparison) -> str:
    header = [name for name, _ in _COLUMNS]
    body = table_rows(comparison)
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    facts = [f"pool {comparison.pool_rows} rows, budget {comparison.budget}, seed {comparison.seed}"]
    if comparison.label_column:
        facts.append(f"labels: {comparison.label_column!r} (entropy in bits, normalised in brackets)")
    facts.append(f"clusters: reference k-means, k={comparison.pool_facts['reference_clusters']}")
    return "\n".join([*facts, "", *lines])


def to_json(comparison: Comparison) -> dict[str, Any]:
    from hf_dataselect.selection.result import _plain

    return _plain(
        {
            "pool_rows": comparison.pool_rows,
            "budget": comparison.budget,
            "seed": comparison.seed,
            "label_column": comparison.label_column,
            "pool": comparison.pool_facts,
            "methods": comparison.methods,
            "label_counts": comparison.label_counts,
            "pool_label_counts": comparison.pool_label_counts,
        }
    )


def write_outputs(comparison: Comparison, output: Path, args: CompareArguments) -> None:
    output.mkdir(parents=True, exist_ok=True)
    atomic.write_json(output / "compare.json", to_json(comparison))
    header = [name for name, _ in _COLUMNS]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(r) + " |" for r in table_rows(comparison)]
    atomic.write_text(output / "compare.md", "\n".join(markdown) + "\n")
    if not args.no_figures:
        draw_figures(comparison, output)


def draw_figures(comparison: Comparison, output: Path) -> list[Path]:
    """``coverage_curves.png``, ``label_distribution.png`` and ``summary.png`` (each when it has data)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    if comparison.curves:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for method, curve in comparison.curves.items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=method)
        ax.set_xlabel("rows selected (in pick order)")
        ax.set_ylabel("SAE latents covered")
        ax.set_title("Feature coverage")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(output / "coverage_curves.png")
        plt.close(fig)
        written.append(output / "coverage_curves.png")
    if comparison.label_counts and comparison.pool_label_counts:
        pool_counts = comparison.pool_label_counts
        names = sorted(pool_counts, key=lambda name: (-pool_counts[name], str(name)))
        x = np.arange(1, len(names) + 1)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        share = comparison.budget / max(comparison.pool_rows, 1)
        ax.plot(
            x, [pool_counts[n] * share for n in names], "--", color="grey", label="proportional to the pool"
        )
        for method, counts in comparison.label_counts.items():
            entropy = comparison.methods[method]["labels"]["entropy_bits"]
            ax.step(
                x,
                [counts.get(str(n), counts.get(n, 0)) for n in names],
                where="mid",
                label=f"{method} (H={entropy:.2f} bits)",
            )
        ax.set_xlabel(f"{comparison.label_column!r} labels, most frequent in the pool first")
        ax.set_ylabel("rows selected")
        ax.set_title(f"Label distribution of each selection ({len(names)} labels)")
        if len(names) <= 30:
            ax.set_xticks(x, [str(n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output / "label_distribution.png")
        plt.close(fig)
        written.append(output / "label_distribution.png")
    measures = {
        "feature coverage": lambda m: m["feature_coverage"]["share"] if "feature_coverage" in m else None,
        "cluster coverage": lambda m: m["cluster_coverage"]["share"],
        "label coverage": lambda m: m["labels"]["share"] if "labels" in m else None,
        "label entropy (normalised)": lambda m: m["labels"]["normalized_entropy"] if "labels" in m else None,
        "near-duplicate share": lambda m: m["near_duplicate_share"],
    }
    present = {
        name: fn for name, fn in measures.items() if fn(next(iter(comparison.methods.values()))) is not None
    }
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / max(len(comparison.methods), 1)
    for i, (method, m) in enumerate(comparison.methods.items()):
        ax.bar(np.arange(len(present)) + i * width, [fn(m) for fn in present.values()], width, label=method)
    ax.set_xticks(
        np.arange(len(present)) + width * (len(comparison.methods) - 1) / 2, list(present), fontsize=8
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title(f"{comparison.budget} of {comparison.pool_rows} rows per method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "summary.png")
    plt.close(fig)
    written.append(output / "summary.png")
    return written
