"""Embedding throughput: ``ds.map(Embeddings(), batched=True)`` vs sentence-transformers ``encode``.

Same model (the offline all-MiniLM-L6-v2), same texts (prompt + response, as kMQ embeds them), same process.
The reference is ``SentenceTransformer(path).encode(texts, batch_size=64)`` in fp32 (it sorts all texts by
length globally). Each variant of ours is timed as the user runs it: ``dataset.map(transform, batched=True)``
with the default map batch size of 1000 rows unless said otherwise (models are loaded before timing).

Timing on a shared machine: the reference and each variant run back to back in several rounds, the ratio is
taken per round (same conditions) and the median reported, with the CPU-time ratio beside it (user + system
time of this process, which other users of the machine disturb much less than wall-clock time).

    python benchmarks/bench_embeddings.py --output benchmarks/results/embeddings.md

Data (defaults, under ../shared/data when present): LIMA chat examples and a seeded sample of the T0 pool.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIMA = SHARED / "lima" / "scripts" / "data" / "raw_train" / "lima" / "train.jsonl"
T0 = SHARED / "self_instruct" / "data" / "finetuning" / "t0_train_50k" / "data_per_template"


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def load_rows(name: str, path: Path, rows: int | None, seed: int) -> list[dict]:
    if name == "lima":
        if not path.is_file():
            raise SystemExit(f"LIMA not found at {path}; pass --lima PATH (a LIMA train.jsonl).")
        data = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        files = sorted(glob.glob(str(path / "*.jsonl")))
        if not files:
            raise SystemExit(f"No T0 *.jsonl files under {path}; pass --t0 FOLDER.")
        data = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
        random.Random(seed).shuffle(data)
    return data[:rows] if rows else data


@dataclass
class Variant:
    name: str
    what: str
    options: dict[str, Any] = field(default_factory=dict)
    map_batch_size: int = 1000
    autocast: bool = False
    int8: bool = False
    fused_gelu: bool = True


VARIANTS = [
    Variant("fp32, 64 rows", "fp32 weights, batches of 64 rows (the reference's batching)",
            {"dtype": "float32", "batch_size": 64, "max_batch_tokens": 10**9}),
    Variant("bf16 autocast, 64 rows", "fp32 weights under torch.autocast(bf16)",
            {"dtype": "float32", "batch_size": 64, "max_batch_tokens": 10**9}, autocast=True),
    Variant("int8 dynamic, 64 rows", "torch dynamic int8 quantisation of every Linear (fbgemm/VNNI)",
            {"dtype": "float32", "batch_size": 64, "max_batch_tokens": 10**9}, int8=True),
    Variant("bf16, 64 rows", "bf16 weights, batches of 64 rows", {"batch_size": 64, "max_batch_tokens": 10**9}),
    Variant("bf16, unfused GELU", "token-budget batches, GELU as its own op (before the oneDNN fusion)", {},
            fused_gelu=False),
    Variant("default", "bf16 weights + token-budget batches (128 rows / 16,384 tokens) + oneDNN Linear+GELU "
            "= Embeddings()", {}),
    Variant("default, map batch 4000", "the default with dataset.map(batch_size=4000)", {}, map_batch_size=4000),
]  # fmt: skip


def build_transform(variant: Variant):
    import torch

    from hf_dataselect.onednn_fusion import ENVIRONMENT_SWITCH
    from hf_dataselect.transforms.embed import Embeddings

    transform = Embeddings(**variant.options)
    if not variant.fused_gelu:
        os.environ[ENVIRONMENT_SWITCH] = "0"
    try:
        runtime = transform.runtime()  # load before timing
    finally:
        os.environ.pop(ENVIRONMENT_SWITCH, None)
    if variant.int8:
        runtime.model = torch.ao.quantization.quantize_dynamic(
            runtime.model, {torch.nn.Linear}, dtype=torch.qint8
        )
    if variant.autocast:
        forward = runtime.model.forward

        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(*args, **kwargs)

        runtime.model.forward = autocast_forward
    return transform


def run_map(dataset, transform, map_batch_size: int) -> tuple[np.ndarray, float, float]:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    mapped = dataset.map(transform, batched=True, batch_size=map_batch_size, keep_in_memory=True,
                         load_from_cache_file=False)  # fmt: skip
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return np.asarray(mapped.with_format("numpy")["embedding"], dtype=np.float32), wall, cpu


def run_reference(model, texts: list[str]) -> tuple[np.ndarray, float, float]:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    out = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return out, time.perf_counter() - started, cpu_seconds() - cpu_started


def measure_dataset(
    name: str, rows: list[dict], args: argparse.Namespace, st_model, variants: list[Variant]
) -> dict:
    from datasets import Dataset

    from hf_dataselect.formatting import RowFormat

    dataset = Dataset.from_list(rows)
    row_format = RowFormat.resolve(dataset.column_names)
    texts = [row_format.text(row) for row in rows]
    tokens = token_count(texts)
    log(f"{name}: {len(texts)} texts, {tokens} tokens (≤ 256 per text)")
    results: dict[str, Any] = {"rows": len(texts), "tokens": tokens, "variants": {}}
    reference_vectors = None
    for variant in variants:
        transform = build_transform(variant)
        ratios, cpu_ratios, walls, ref_walls = [], [], [], []
        vectors = None
        rounds = args.rounds if variant.name == "default" else args.ablation_rounds
        for round_index in range(rounds):
            reference, ref_wall, ref_cpu = run_reference(st_model, texts)
            vectors, wall, cpu = run_map(dataset, transform, variant.map_batch_size)
            reference_vectors = reference if reference_vectors is None else reference_vectors
            ratios.append(ref_wall / wall)
            cpu_ratios.append(ref_cpu / cpu)
            walls.append(wall)
            ref_walls.append(ref_wall)
            log(
                f"{name} / {variant.name} round {round_index}: ST {ref_wall:.1f}s, ours {wall:.1f}s, ×{ref_wall / wall:.2f}"
            )
        cosine = (vectors * reference_vectors).sum(1)
        results["variants"][variant.name] = {
            "what": variant.what,
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "seconds_median": statistics.median(walls),
            "reference_seconds_median": statistics.median(ref_walls),
            "rounds": rounds,
            "rows_per_s": len(texts) / statistics.median(walls),
            "reference_rows_per_s": len(texts) / statistics.median(ref_walls),
            "cos_min": float(cosine.min()),
            "cos_mean": float(cosine.mean()),
        }
        del transform
    return results


_TOKENIZER = None


def token_count(texts: list[str]) -> int:
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from hf_dataselect.models import default_encoder_path

        _TOKENIZER = AutoTokenizer.from_pretrained(default_encoder_path())
    ids = _TOKENIZER(texts, truncation=True, max_length=256)["input_ids"]
    return sum(len(i) for i in ids)


def full_pass(name: str, rows: list[dict]) -> dict:
    """Embed a whole dataset once with the defaults (model load excluded, as a user re-running would see)."""
    from datasets import Dataset

    from hf_dataselect.formatting import RowFormat
    from hf_dataselect.transforms.embed import Embeddings

    dataset = Dataset.from_list(rows)
    row_format = RowFormat.resolve(dataset.column_names)
    tokens = token_count([row_format.text(row) for row in rows])
    transform = Embeddings()
    transform.runtime()
    _, wall, cpu = run_map(dataset, transform, 1000)
    log(f"full {name}: {len(rows)} rows in {wall:.1f}s")
    return {"rows": len(rows), "tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "rows_per_s": len(rows) / wall, "tokens_per_s": tokens / wall}  # fmt: skip


def write_markdown(path: Path, args: argparse.Namespace, results: dict, command: str) -> None:
    import torch

    from hf_dataselect.models import cpu_has_native_bf16

    lines = [
        "# Embedding throughput: `ds.map(Embeddings(), batched=True)` vs sentence-transformers",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (native bf16: {cpu_has_native_bf16()}), "
        f"no GPU; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "- Model: all-MiniLM-L6-v2 (offline copy), max 256 tokens, prompt + response text",
        "- Reference: `SentenceTransformer(path).encode(texts, batch_size=64)`, fp32, run back to back with each "
        f"variant ({args.rounds} rounds for the default, {args.ablation_rounds} for the other variants); "
        "× = median over rounds of (reference time / our time), CPU × = the same with process CPU time",
        "- Cosine: to the reference's fp32 embeddings, per row (min / mean)",
        "",
    ]
    for name, data in results["datasets"].items():
        lines += [
            f"## {name}: {data['rows']} rows, {data['tokens']:,} tokens",
            "",
            "| variant | what | × ST (wall) | × ST (CPU) | ours rows/s | ST rows/s | cos min | cos mean |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for variant, v in data["variants"].items():
            lines.append(
                f"| {variant} | {v['what']} | {v['ratio_median']:.2f} | {v['cpu_ratio_median']:.2f} | "
                f"{v['rows_per_s']:.1f} | {v['reference_rows_per_s']:.1f} | {v['cos_min']:.4f} | {v['cos_mean']:.5f} |"
            )
        lines.append("")
    if results.get("full"):
        lines += [
            "## Whole datasets with the defaults (one pass, model loaded beforehand)",
            "",
            "| dataset | rows | tokens | seconds | rows/s | tokens/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, f in results["full"].items():
            lines.append(
                f"| {name} | {f['rows']} | {f['tokens']:,} | {f['seconds']:.1f} | {f['rows_per_s']:.1f} | {f['tokens_per_s']:.0f} |"
            )
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lima", type=Path, default=LIMA, help=f"LIMA train.jsonl (default: {LIMA})")
    parser.add_argument("--t0", type=Path, default=T0, help=f"folder of T0 *.jsonl (default: {T0})")
    parser.add_argument("--lima-rows", type=int, default=300, help="rows for the timed rounds")
    parser.add_argument("--t0-rows", type=int, default=1500, help="rows for the timed rounds")
    parser.add_argument("--t0-full-rows", type=int, default=5000, help="rows of the T0 whole-dataset pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds for the default configuration")
    parser.add_argument("--ablation-rounds", type=int, default=1, help="rounds for the other variants")
    parser.add_argument("--variants", default=None, help="variant names separated by ; (default: all)")
    parser.add_argument("--no-full", action="store_true", help="skip the whole-dataset passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name, path in (("LIMA", args.lima), ("T0", args.t0)):
        if not path.exists():
            log(f"{name} data not found at {path}; pass --{name.lower()} PATH")
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from sentence_transformers import SentenceTransformer

    from hf_dataselect.models import default_encoder_path

    variants = VARIANTS
    if args.variants:
        wanted = [name.strip() for name in args.variants.split(";")]
        variants = [v for v in VARIANTS if v.name in wanted]
    st_model = SentenceTransformer(default_encoder_path(), device="cpu")
    st_model.encode(["warm up"] * 8)
    results: dict[str, Any] = {"datasets": {}, "full": {}}
    lima_rows = load_rows("lima", args.lima, None, args.seed)
    t0_rows = load_rows("t0", args.t0, args.t0_full_rows, args.seed)
    results["datasets"]["LIMA"] = measure_dataset(
        "LIMA", lima_rows[: args.lima_rows], args, st_model, variants
    )
    results["datasets"]["T0 sample"] = measure_dataset(
        "T0", t0_rows[: args.t0_rows], args, st_model, variants
    )
    if not args.no_full:
        results["full"]["LIMA (all train rows)"] = full_pass("LIMA", lima_rows)
        results["full"][f"T0 ({args.t0_full_rows} seeded sample)"] = full_pass("T0", t0_rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.output:
        write_markdown(args.output, args, results, "python " + " ".join(sys.argv))
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
