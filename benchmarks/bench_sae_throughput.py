"""SAE benchmark (f): ``SAEFeatures`` throughput against ``Embeddings`` on the same rows, model and max_length.

Both transforms run all-MiniLM-L6-v2 over the same T0 rows at the same truncation; SAEFeatures also TopK-encodes
every kept token with the SAE of bench_sae_training.py and max-pools per row. Timed: ``transform.encode(texts)``
after a warm-up (models loaded, one small batch run), in alternating rounds, median rows/s per variant:

* ``embeddings`` — ``Embeddings(max_length=...)`` with its default dtype (bf16 on CPUs with native bf16);
* ``embeddings_fp32`` — the same in float32;
* ``sae_fp32`` / ``sae_bf16`` — ``SAEFeatures(dtype=...)``: the model forward in that dtype, the SAE in float32;
* ``sae_auto`` — ``SAEFeatures()`` with its default dtype.

It also reports how much the bf16 forward changes the features: per-row Jaccard similarity of the active
latent sets and Pearson r of ``sae_n_active`` between the fp32 and bf16 forwards, at τ = 0 and at τ = the 0.9
quantile of the fp32 pooled activations.

    python benchmarks/bench_sae_throughput.py --output benchmarks/results/sae_throughput.json

``--sae`` defaults to the SAE written by bench_sae_training.py. Data defaults to ../shared/data
(/work/shared/data); the script stops with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sae_common import LIMA, T0_DIR, check_data, t0_rows, texts_of  # noqa: E402


def build_variants(args) -> dict:
    from hf_dataselect.transforms.embed import Embeddings
    from hf_dataselect.transforms.sae_features import SAEFeatures

    sae = {"sae": args.sae, "hookpoint": args.hookpoint, "max_length": args.max_length}
    variants = {
        "embeddings": Embeddings(max_length=args.max_length),
        "embeddings_fp32": Embeddings(max_length=args.max_length, dtype="float32"),
        "sae_auto": SAEFeatures(**sae),
        "sae_fp32": SAEFeatures(**sae, dtype="float32"),
        "sae_bf16": SAEFeatures(**sae, dtype="bfloat16"),
    }
    return {name: variants[name] for name in args.variants}


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.union1d(a, b).size
    return 1.0 if union == 0 else np.intersect1d(a, b).size / union


def agreement(fp32, bf16, texts: list[str]) -> dict:
    """How much the bf16 forward changes the active latent sets (fp32 forward as the reference)."""
    from scipy.stats import pearsonr

    runner32, runner16 = fp32.runtime(), bf16.runtime()
    pooled = {}
    for name, runner in (("fp32", runner32), ("bf16", runner16)):
        rows = []
        for batch in runner.reader.batches(texts):
            values = runner.pool(batch).cpu().numpy()
            rows += [(row, values[i]) for i, row in enumerate(batch.rows)]
        rows.sort(key=lambda item: item[0])
        pooled[name] = np.stack([values for _, values in rows])
    nonzero = pooled["fp32"][pooled["fp32"] > 0]
    out = {"max_abs_pooled_diff": float(np.abs(pooled["fp32"] - pooled["bf16"]).max())}
    for label, tau in (("tau=0", 0.0), ("tau=q0.9", float(np.quantile(nonzero, 0.9)))):
        sets = {name: [np.flatnonzero(row > tau) for row in matrix] for name, matrix in pooled.items()}
        scores = [jaccard(a, b) for a, b in zip(sets["fp32"], sets["bf16"], strict=True)]
        counts = {name: np.array([s.size for s in rows]) for name, rows in sets.items()}
        out[label] = {
            "tau": tau,
            "mean_jaccard": float(np.mean(scores)),
            "min_jaccard": float(np.min(scores)),
            "identical_rows": float(np.mean([s == 1.0 for s in scores])),
            "n_active_pearson": float(pearsonr(counts["fp32"], counts["bf16"])[0]),
            "mean_n_active_fp32": float(counts["fp32"].mean()),
            "mean_n_active_bf16": float(counts["bf16"].mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default="/tmp/hf_dataselect_bench_sae/sae")
    parser.add_argument("--hookpoint", default="encoder.layer.5")
    parser.add_argument("--lima", type=Path, default=LIMA, help="only checked for presence")
    parser.add_argument("--t0-dir", type=Path, default=T0_DIR)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=256, help="the same for every variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["embeddings", "embeddings_fp32", "sae_auto", "sae_fp32", "sae_bf16"],
        choices=["embeddings", "embeddings_fp32", "sae_auto", "sae_fp32", "sae_bf16"],
    )
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sae_throughput.json")
    args = parser.parse_args()
    import torch

    check_data(args.lima, args.t0_dir)
    print(f"Data: {args.t0_dir} (../shared/data); SAE: {args.sae}")
    texts = texts_of(t0_rows(args.t0_dir, args.rows, args.seed))
    variants = build_variants(args)
    for transform in variants.values():
        transform.encode(texts[:8])  # load the models and run one batch
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads = [Path("/proc/loadavg").read_text().split()[:3]]
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            variants[name].encode(texts)
            times[name].append(time.perf_counter() - start)
            print(f"round {round_index} {name}: {len(texts) / times[name][-1]:.1f} rows/s", flush=True)
        loads.append(Path("/proc/loadavg").read_text().split()[:3])
    rows_per_s = {name: len(texts) / statistics.median(seconds) for name, seconds in times.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "rows": len(texts),
        "max_length": args.max_length,
        "load_average_per_round": loads,
        "seconds": times,
        "rows_per_s": rows_per_s,
        "model_dtypes": {
            name: str(next(t.runtime().reader.model.parameters()).dtype)
            if name.startswith("sae")
            else str(t.runtime().dtype)
            for name, t in variants.items()
        },
    }
    if not args.skip_agreement and {"sae_fp32", "sae_bf16"} <= set(variants):
        report["bf16_vs_fp32_features"] = agreement(variants["sae_fp32"], variants["sae_bf16"], texts)
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
