"""SAE feature benchmarks: (c) the paper's length claim, (d) SAE encoding overhead inside SAEFeatures.

(c) Pearson (and Spearman) r between a row's token count and ``sae_n_active`` on LIMA rows and on T0 rows
    (the SAE paper reports r = 0.92 for its Llama-3.1-8B SAE at τ = 10). τ = 0 (every latent in some token's
    TopK code) and τ at calibrated quantiles of the non-zero activations.
(d) On the same batches: time of the model forward up to the hookpoint vs time of the SAE part (TopK-encode
    every kept token, max-pool per row, extract the active latents). Target: SAE ≤ 15 % of the forward.
    Measured for each model dtype of ``--overhead-dtypes`` (``auto`` is bf16 on CPUs with native bf16, where
    the forward is about 2x faster, so the SAE's share grows; the SAE always runs in float32).

    python benchmarks/bench_sae_features.py --sae /tmp/hf_dataselect_bench_sae/sae --output benchmarks/results/sae_features.json

``--sae`` defaults to the SAE written by bench_sae_training.py (MiniLM, encoder.layer.5, 6144 latents, k = 32).
Data defaults to ../shared/data (/work/shared/data); the script stops with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sae_common import LIMA, T0_DIR, check_data, lima_rows, t0_rows, texts_of  # noqa: E402


def token_counts(reader, texts: list[str]) -> np.ndarray:
    """Kept (non-special) tokens per text after truncation: what the features are computed on."""
    tokenizer = reader.tokenizer
    special = set(reader.special_ids)
    encoded = tokenizer(texts, truncation=True, max_length=reader.max_length)
    return np.array([sum(1 for t in ids if t not in special) for ids in encoded["input_ids"]])


def length_correlations(args, transform_options: dict) -> dict:
    import datasets
    from scipy.stats import pearsonr, spearmanr

    from hf_dataselect.transforms.sae_features import SAEFeatures

    pools = {
        "lima": lima_rows(args.lima),
        # another seeded sample than the SAE's training rows (overlap ≈ 2000² / 50k ≈ 80 rows)
        "t0": t0_rows(args.t0_dir, args.t0_rows, args.seed + 1),
    }
    results = {}
    for name, rows in pools.items():
        texts = texts_of(rows)
        dataset = datasets.Dataset.from_dict({"text": texts})
        base = SAEFeatures(**transform_options)
        runner = base.runtime()
        lengths = token_counts(runner.reader, texts)
        start = time.perf_counter()
        pooled_rows = []
        for batch in runner.reader.batches(texts):
            pooled = runner.pool(batch).cpu().numpy()
            for position, row in enumerate(batch.rows):
                pooled_rows.append((row, pooled[position]))
        seconds = time.perf_counter() - start
        pooled_rows.sort(key=lambda item: item[0])
        pooled_matrix = np.stack([p for _, p in pooled_rows])
        per_threshold = {}
        for quantile in [None, *args.quantiles]:
            if quantile is None:
                tau, label = 0.0, "tau=0"
            else:
                calibrated = SAEFeatures(
                    **transform_options, threshold_quantile=quantile, calibration_rows=512
                )
                calibrated.__dict__["_runtime_object"] = runner
                tau = calibrated.resolve(dataset, cache_dir=args.work / "cache").calibrated_threshold
                label = f"q={quantile}"
            n_active = (pooled_matrix > tau).sum(1)
            per_threshold[label] = {
                "tau": float(tau),
                "pearson_r": float(pearsonr(lengths, n_active)[0]),
                "spearman_r": float(spearmanr(lengths, n_active)[0]),
                "mean_n_active": float(n_active.mean()),
                "min_n_active": int(n_active.min()),
                "max_n_active": int(n_active.max()),
            }
        results[name] = {
            "rows": len(texts),
            "mean_tokens": float(lengths.mean()),
            "median_tokens": float(np.median(lengths)),
            "max_tokens": int(lengths.max()),
            "truncated_rows": int((lengths >= runner.reader.max_length - 2).sum()),
            "seconds_features": seconds,
            "thresholds": per_threshold,
        }
        print(name, json.dumps(results[name], indent=1))
    return results


def overhead(args, transform_options: dict) -> dict:
    return {
        dtype: overhead_for(args, {**transform_options, "dtype": dtype}) for dtype in args.overhead_dtypes
    }


def overhead_for(args, transform_options: dict) -> dict:
    import torch

    from hf_dataselect.sae.activations import TokenActivations
    from hf_dataselect.transforms.sae_features import SAEFeatures

    runner = SAEFeatures(**transform_options).runtime()
    reader = runner.reader
    model_dtype = str(next(reader.model.parameters()).dtype)
    samples = {
        "lima (long)": texts_of(lima_rows(args.lima))[: args.overhead_rows],
        "t0 (short)": texts_of(t0_rows(args.t0_dir, args.overhead_rows, args.seed + 2)),
    }
    special = torch.tensor(reader.special_ids)
    results = {}
    for name, texts in samples.items():
        lm_times, sae_times, tokens = [], [], 0
        encoded = reader.tokenizer(
            texts, truncation=True, max_length=reader.max_length, return_special_tokens_mask=True
        )
        order = np.argsort(-np.array([len(ids) for ids in encoded["input_ids"]]), kind="stable")
        for start in range(0, len(order), reader.batch_size):
            chosen = order[start : start + reader.batch_size]
            features = reader.tokenizer.pad(
                {
                    "input_ids": [encoded["input_ids"][i] for i in chosen],
                    "special_tokens_mask": [encoded["special_tokens_mask"][i] for i in chosen],
                },
                return_tensors="pt",
            )
            keep = features["attention_mask"].bool() & ~features["special_tokens_mask"].bool()
            keep &= ~torch.isin(features["input_ids"], special)
            lm, sae = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                hidden = reader._forward(features)
                t1 = time.perf_counter()
                batch = TokenActivations(rows=chosen, lengths=keep.sum(1).numpy(), activations=hidden[keep])
                runner.active(runner.pool(batch), 0.0)
                t2 = time.perf_counter()
                lm.append(t1 - t0)
                sae.append(t2 - t1)
            lm_times.append(statistics.median(lm))
            sae_times.append(statistics.median(sae))
            tokens += int(keep.sum())
        lm_total, sae_total = sum(lm_times), sum(sae_times)
        results[name] = {
            "rows": len(texts),
            "model_dtype": model_dtype,
            "kept_tokens": tokens,
            "lm_forward_s": lm_total,
            "sae_s": sae_total,
            "sae_over_lm": sae_total / lm_total,
            "lm_tokens_per_s": tokens / lm_total,
        }
        print(name, json.dumps(results[name]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default="/tmp/hf_dataselect_bench_sae/sae")
    parser.add_argument("--hookpoint", default="encoder.layer.5")
    parser.add_argument("--model", default=None, help="default: the offline all-MiniLM-L6-v2")
    parser.add_argument("--lima", type=Path, default=LIMA)
    parser.add_argument("--t0-dir", type=Path, default=T0_DIR)
    parser.add_argument("--t0-rows", type=int, default=2000)
    parser.add_argument("--quantiles", type=float, nargs="*", default=[0.5, 0.9])
    parser.add_argument("--overhead-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--dtype", default="auto", help="model dtype of the correlation part (SAEFeatures.dtype)"
    )
    parser.add_argument("--overhead-dtypes", nargs="+", default=["auto", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_dataselect_bench_sae"))
    parser.add_argument("--skip-correlation", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sae_features.json")
    args = parser.parse_args()
    from hf_dataselect.sae import kernels

    check_data(args.lima, args.t0_dir)
    print(f"Data: {args.lima} and {args.t0_dir} (../shared/data); SAE: {args.sae}")
    options = {
        "model": args.model,
        "sae": args.sae,
        "hookpoint": args.hookpoint,
        "batch_size": args.batch_size,
    }
    report = {
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "overhead": overhead(args, options),
        "screen_stats": dict(kernels.SCREEN_STATS),
    }
    if not args.skip_correlation:
        report["length_correlation"] = length_correlations(args, {**options, "dtype": args.dtype})
    report["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
