"""Does a selector pick more diverse data? Coverage of hidden task labels on the real T0 pool (issues 4 and 6).

Pool: every T0/P3 per-template file of the self-instruct release (232 templates, 45,023 rows; ``{prompt,
completion}``, the trailing ``<|endoftext|>`` removed). The template (file name) is a hidden label: the selectors
never see it. For each budget (1 % and 5 % by default) and method this reports templates covered, entropy of
the selected rows' template distribution (bits; normalised by log2 of the templates in the pool), the share of
exact duplicates (same prompt + completion text, whitespace collapsed) and of near-duplicates (another selected
row at cosine >= 0.95 on MiniLM embeddings), SAE-latent coverage, mean length and time; and the Pearson
correlation of ``sae_n_active`` with the row's length in tokens.

The expensive columns are computed once and cached with ``save_to_disk`` under ``--cache`` (never in the
repository): MiniLM embeddings (~15 min on 2 CPU cores) and SAE features from an SAE trained on the pool
(``sae="auto"``, MiniLM hidden states, ``--threshold-quantile``). Reruns only select and measure.

    python benchmarks/bench_selection_coverage.py                          # all methods, 1 % and 5 %
    python benchmarks/bench_selection_coverage.py --prepare-only           # just build the cached columns
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path("/work/shared/data/self_instruct/data/finetuning/t0_train_50k/data_per_template")
DEFAULT_CACHE = Path("/work/cache/coverage")
DEFAULT_METHODS = "random,longest,kcenter,kmq,sae-greedy,sae-simscale"
logger = logging.getLogger("bench_selection_coverage")


def load_t0_pool(root: Path):
    """All per-template files, with the hidden ``template`` label and completions without ``<|endoftext|>``."""
    import datasets

    files = sorted(glob.glob(str(root / "*.jsonl")))
    if not files:
        raise SystemExit(f"No *.jsonl files under {root}; pass --data.")
    parts = []
    for path in files:
        part = datasets.load_dataset("json", data_files=path, split="train")
        parts.append(part.add_column("template", [Path(path).stem] * len(part)))
    pool = datasets.concatenate_datasets(parts)
    return pool.map(
        lambda batch: {"completion": [c.replace("<|endoftext|>", "").strip() for c in batch["completion"]]},
        batched=True,
        desc="Cleaning completions",
    )


def cached(path: Path, build):
    """``load_from_disk(path)`` when present, else ``build()`` saved there (atomically) and reloaded."""
    import datasets

    if (path / "dataset_info.json").exists():
        logger.info("Reusing %s", path)
        return datasets.load_from_disk(str(path))
    dataset = build()
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    dataset.save_to_disk(str(staging))
    os.replace(staging, path)
    return datasets.load_from_disk(str(path))


def prepare(args: argparse.Namespace):
    from hf_dataselect.transforms.embed import Embeddings

    args.cache.mkdir(parents=True, exist_ok=True)
    embedded = cached(
        args.cache / "t0_pool_embedded",
        lambda: load_t0_pool(args.data).map(Embeddings(), batched=True, batch_size=1000, desc="Embedding"),
    )
    if not args.sae_methods:
        return embedded

    def with_features():
        from hf_dataselect.transforms.sae_features import add_sae_features

        return add_sae_features(
            embedded,
            sae="auto",
            threshold_quantile=args.threshold_quantile,
            prompt_column="prompt",
            response_column="completion",
            cache_dir=str(args.cache / "sae"),
            auto_sae={"max_rows": args.sae_train_rows, "train_tokens": args.sae_train_tokens},
        )

    name = f"t0_pool_sae_q{args.threshold_quantile}_r{args.sae_train_rows}_t{args.sae_train_tokens}"
    return cached(args.cache / name, with_features)


def measure(args: argparse.Namespace, pool) -> dict:
    from hf_dataselect import metrics, select
    from hf_dataselect.commands.compare import token_lengths
    from hf_dataselect.data import matrix_column
    from hf_dataselect.selection.sparse_features import SparseFeatures

    texts = [f"{p}\n\n{c}" for p, c in zip(pool["prompt"], pool["completion"], strict=True)]
    lengths = token_lengths(texts)
    embeddings = matrix_column(pool, "embedding")
    labels = list(pool["template"])
    features = (
        SparseFeatures.from_dataset(pool, "sae_indices") if "sae_indices" in pool.column_names else None
    )
    hidden = pool.remove_columns(["template"])
    report: dict = {"rows": len(pool), "templates": len(set(labels)), "results": []}
    if features is not None:
        report["sae"] = {
            "latents_active": int(np.count_nonzero(features.latent_frequencies())),
            "mean_active_per_row": float(features.sizes.mean()),
            "pearson_r_n_active_vs_tokens": metrics.pearson_r(features.sizes, lengths),
            "pearson_r_n_active_vs_tokens_capped_512": metrics.pearson_r(
                features.sizes, np.minimum(lengths, 512)
            ),
        }
        logger.info("SAE facts: %s", report["sae"])
    for budget in args.budgets:
        for method in args.methods:
            options = dict(prompt_column="prompt", response_column="completion")
            if method == "kmq":
                options["silhouette_sample_size"] = 5000
            started = time.perf_counter()
            result = select(hidden, method, budget, seed=args.seed, **options)
            seconds = time.perf_counter() - started
            positions = result.positions
            measured = metrics.selection_metrics(
                positions,
                features=features,
                labels=labels,
                texts=texts,
                embeddings=embeddings,
                lengths=lengths,
            )
            label = measured["labels"]
            row = {
                "budget": budget,
                "rows": len(positions),
                "method": method,
                "seconds": seconds,
                "templates_covered": label["covered"],
                "entropy_bits": label["entropy_bits"],
                "normalized_entropy": label["normalized_entropy"],
                "largest_template_share": label["largest_label_share"],
                "exact_duplicate_share": measured["exact_duplicate_share"],
                "near_duplicate_share": measured["near_duplicate_share"],
                "mean_tokens": measured["mean_tokens"],
                "feature_coverage": measured.get("feature_coverage", {}).get("share"),
                "info": {k: result.info[k] for k in ("delta", "rounds", "clustering") if k in result.info},
            }
            logger.info("%s", json.dumps(row, default=str))
            report["results"].append(row)
    return report


def to_markdown(report: dict, command: str) -> str:
    lines = [
        "# Coverage of hidden T0 templates (real data)",
        "",
        f"Command: `{command}`  ",
        f"Machine: 2-core CPU, no GPU. Date: {time.strftime('%Y-%m-%d')}.  ",
        f"Pool: {report['rows']} rows, {report['templates']} templates (hidden label).",
        "",
    ]
    if "sae" in report:
        sae = report["sae"]
        lines += [
            f"SAE features: MiniLM + pool-trained TopK SAE, {sae['latents_active']} latents active, "
            f"{sae['mean_active_per_row']:.0f} per row on average. Pearson r(sae_n_active, tokens) = "
            f"{sae['pearson_r_n_active_vs_tokens']:.3f} (tokens capped at 512, the encoder's window: "
            f"{sae['pearson_r_n_active_vs_tokens_capped_512']:.3f}).",
            "",
        ]
    lines += [
        "| budget | method | templates | entropy (bits) | normalised | largest template | exact dup | near dup "
        "| SAE latents | mean tokens | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        feature = "–" if r["feature_coverage"] is None else f"{r['feature_coverage']:.1%}"
        lines.append(
            f"| {r['rows']} | {r['method']} | {r['templates_covered']}/{report['templates']} | "
            f"{r['entropy_bits']:.2f} | {r['normalized_entropy']:.3f} | {r['largest_template_share']:.1%} | "
            f"{r['exact_duplicate_share']:.1%} | {r['near_duplicate_share']:.1%} | {feature} | "
            f"{r['mean_tokens']:.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"T0 per-template folder ({DEFAULT_DATA})"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--budgets", default="0.01,0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold-quantile", type=float, default=0.9)
    parser.add_argument(
        "--sae-train-rows", type=int, default=20_000, help="rows whose activations train the SAE"
    )
    parser.add_argument("--sae-train-tokens", type=int, default=2_000_000, help="SAE training tokens")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--output", type=Path, help="markdown table (e.g. benchmarks/results/coverage.md)")
    parser.add_argument("--json", type=Path, help="raw results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} does not exist: this benchmark needs the T0 files (pass --data).")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.sae_methods = any(m.startswith("sae-") for m in args.methods)
    pool = prepare(args)
    if args.prepare_only:
        return
    report = measure(args, pool)
    command = "python benchmarks/bench_selection_coverage.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = to_markdown(report, command.strip())
    if args.output:
        args.output.write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
