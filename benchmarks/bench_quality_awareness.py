"""Quality awareness: which share of each selector's picks comes from strong systems / correct solutions?

Two real pools whose rows carry a known quality label the selectors never see:

* **systems**: the 252 user-oriented prompts of Self-Instruct, each answered by 8 systems of known quality
  (``../shared/data/self_instruct/human_eval/predictions``): 2,016 rows. Quality order (README of the data):
  davinci < davinci-t0-ft ≈ davinci-superni-ft < davinci-self-instruct(-and-superni-ft) < text-davinci-001 <
  text-davinci-002 ≈ text-davinci-003. *Strong* = the three text-davinci systems (37.5 % of the pool).
* **gsm8k**: 4 model solutions per GSM8K test question with ``is_correct``
  (``../shared/data/gsm8k/grade_school_math/data/example_model_solutions.jsonl``): 5,276 rows.

Quality columns a selector can be given (each z-scored over the pool, so kMQ's temperature means the same for
all of them), from cheapest to most informed:

* ``length`` — response length in characters (a heuristic; what "longest" ranks by);
* ``compression`` — zlib compressed size / raw size of the response (a heuristic against repetition);
* ``ref_ppl`` — minus the log perplexity of the response given the prompt under a small Llama trained on the
  fly on a reference corpus (LIMA's curated answers for *systems*, GSM8K *train* gold solutions for *gsm8k*):
  the only model-based scorer that runs offline here; no pretrained reward model is available offline;
* ``oracle`` — the hidden label itself (system rank / ``is_correct``): an upper bound, not a real scorer.

    python benchmarks/bench_quality_awareness.py              # everything, cached under --cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downstream_common import kept_interpretation, log, read_jsonl, write_json

DATA = Path("/work/shared/data")
SYSTEMS = {  # name -> quality rank (higher is better), from the data's README
    "davinci": 0,
    "davinci-t0-ft": 1,
    "davinci-superni-ft": 1,
    "davinci-self-instruct": 2,
    "davinci-self-instruct-and-superni-ft": 2,
    "text-davinci-001": 3,
    "text-davinci-002": 4,
    "text-davinci-003": 4,
}
STRONG = {"text-davinci-001", "text-davinci-002", "text-davinci-003"}
WEAK = {"davinci", "davinci-t0-ft", "davinci-superni-ft"}
SCORERS = ("length", "compression", "ref_ppl", "oracle")
PLAIN_METHODS = ("random", "longest", "kcenter", "kmq", "sae-greedy", "sae-simscale")
QUALITY_METHODS = ("kmq", "deita")
SEEDED = {"random", "kcenter", "kmq"}
SEEDS = (0, 1, 2, 3, 4)
BUDGET = 0.10
SAE_MAX_TOKENS = 128  # SAE features read the first 128 tokens of a row (CPU budget)
RESULTS_MD = Path(__file__).resolve().parent / "results" / "quality_awareness.md"
DEFAULT_CACHE = Path(os.environ.get("HF_DATASELECT_BENCH_CACHE", "/work/cache/hf_dataselect")) / "quality"


# -- pools ----------------------------------------------------------------------------------------------------
def systems_pool(data: Path) -> list[dict[str, Any]]:
    rows = []
    for system in SYSTEMS:
        path = data / "self_instruct" / "human_eval" / "predictions" / f"{system}_predictions.jsonl"
        for i, row in enumerate(read_jsonl(path)):
            prompt = row["instruction"].strip()
            if row.get("input", "").strip():
                prompt += "\n\n" + row["input"].strip()
            response = (row["response"] or "").strip() or "(no answer)"
            rows.append(
                {"id": f"{system}-{i}", "prompt": prompt, "completion": response, "system": system, "item": i}
            )
    return rows


def gsm8k_pool(data: Path) -> list[dict[str, Any]]:
    rows = []
    path = data / "gsm8k" / "grade_school_math" / "data" / "example_model_solutions.jsonl"
    for i, row in enumerate(read_jsonl(path)):
        for model in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"):
            solution = row[model]
            rows.append(
                {
                    "id": f"{model}-{i}",
                    "prompt": row["question"],
                    "completion": solution["solution"].strip() or "(no answer)",
                    "correct": int(bool(solution["is_correct"])),
                    "solver": model,
                    "item": i,
                }
            )
    return rows


def reference_corpus(pool_name: str, data: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs the reference LM learns from: curated answers, never the pool itself."""
    if pool_name == "systems":
        pairs = []
        for row in read_jsonl(data / "lima" / "scripts" / "data" / "raw_train" / "lima" / "train.jsonl"):
            turns = row["conversations"]
            if len(turns) >= 2:
                pairs.append((turns[0], turns[1]))
        return pairs
    rows = read_jsonl(data / "gsm8k" / "grade_school_math" / "data" / "train.jsonl")
    return [(r["question"], r["answer"].replace("####", "A:")) for r in rows[:3000]]


# -- quality scorers ------------------------------------------------------------------------------------------
def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(1, len(raw))


def train_reference_lm(pairs: list[tuple[str, str]], folder: Path) -> Path:
    """A ~1M-parameter Llama trained from scratch on ``pairs`` (response loss), saved with its tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_dataselect.recipes import sft_examples
    from hf_dataselect.testing import build_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer(folder, [f"{p}\n\n{r}" for p, r in pairs], vocab_size=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    data = sft_examples(
        Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [r for _, r in pairs]}),
        conversational=True,
    )
    args = SFTConfig(
        output_dir=str(folder / "trainer"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        num_train_epochs=3,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=320,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(str(folder), safe_serialization=True)
    log(f"reference LM on {len(pairs)} pairs: {time.perf_counter() - started:.0f} s")
    return folder


def add_quality_columns(pool: Any, pool_name: str, data: Path, cache: Path) -> Any:
    from hf_dataselect.transforms.quality import PerplexityScores

    responses = pool["completion"]
    columns: dict[str, np.ndarray] = {
        "length": np.array([len(r) for r in responses], dtype=np.float64),
        "compression": np.array([compression_ratio(r) for r in responses], dtype=np.float64),
        "oracle": np.array(
            [SYSTEMS[s] for s in pool["system"]] if pool_name == "systems" else pool["correct"],
            dtype=np.float64,
        ),
    }
    lm = train_reference_lm(reference_corpus(pool_name, data), cache / f"ref_lm_{pool_name}")
    scored = pool.map(PerplexityScores(model=str(lm), max_length=320, batch_size=16), batched=True)
    columns["ref_ppl"] = -np.log(np.asarray(scored["perplexity"], dtype=np.float64))
    for name, values in columns.items():
        z = (values - values.mean()) / (values.std() or 1.0)
        pool = pool.add_column(f"q_{name}", z.tolist())
    return pool


# -- the pools with every column -------------------------------------------------------------------------------
def prepared_pool(pool_name: str, data: Path, cache: Path, with_sae: bool) -> Any:
    import datasets

    from hf_dataselect.transforms.embed import Embeddings
    from hf_dataselect.transforms.sae_features import add_sae_features

    target = cache / f"pool_{pool_name}"
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    rows = systems_pool(data) if pool_name == "systems" else gsm8k_pool(data)
    pool = datasets.Dataset.from_list(rows)
    started = time.perf_counter()
    pool = pool.map(Embeddings(), batched=True, batch_size=1000, desc="Embedding")
    log(f"{pool_name}: embeddings of {len(pool)} rows in {time.perf_counter() - started:.0f} s")
    if with_sae:
        started = time.perf_counter()
        pool = add_sae_features(pool, cache_dir=str(cache / "sae"), sae="auto", max_length=SAE_MAX_TOKENS)
        log(f"{pool_name}: SAE features in {time.perf_counter() - started:.0f} s")
    pool = add_quality_columns(pool, pool_name, data, cache)
    pool.save_to_disk(str(target))
    return datasets.load_from_disk(str(target))


# -- selections ------------------------------------------------------------------------------------------------
def label_stats(pool_name: str, pool: Any, positions: np.ndarray) -> dict[str, float]:
    items = np.asarray(pool["item"])[positions]
    if pool_name == "systems":
        systems = np.asarray(pool["system"])[positions]
        return {
            "strong": float(np.isin(systems, list(STRONG)).mean()),
            "weak": float(np.isin(systems, list(WEAK)).mean()),
            "rank": float(np.mean([SYSTEMS[s] for s in systems])),
            "items": len(set(items.tolist())),
        }
    correct = np.asarray(pool["correct"])[positions]
    return {"correct": float(correct.mean()), "items": len(set(items.tolist()))}


def run_selections(pool_name: str, pool: Any, cache: Path, methods: list[str]) -> dict[str, Any]:
    from hf_dataselect.selection import select

    path = cache / f"results_{pool_name}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    view = pool.remove_columns([c for c in ("system", "correct", "solver") if c in pool.column_names])
    plain = [
        m
        for m in PLAIN_METHODS
        if m in methods and (not m.startswith("sae-") or "sae_indices" in pool.column_names)
    ]
    configs: list[tuple[str, str, str, dict[str, Any]]] = [(m, "none", m, {}) for m in plain]
    for scorer in SCORERS:
        for method in QUALITY_METHODS:
            configs.append((f"{method}+{scorer}", scorer, method, {"quality_column": f"q_{scorer}"}))
    for key, scorer, method, options in configs:
        if key in results:
            continue
        runs = []
        for seed in SEEDS if method in SEEDED else (0,):
            started = time.perf_counter()
            result = select(view, method, BUDGET, seed=seed, **options)
            runs.append(
                {
                    "seed": seed,
                    "seconds": time.perf_counter() - started,
                    **label_stats(pool_name, pool, result.positions),
                }
            )
        results[key] = {"method": method, "scorer": scorer, "runs": runs}
        write_json(path, results)
        log(
            f"{pool_name} {key}: "
            + ", ".join(
                f"{k}={np.mean([r[k] for r in runs]):.3f}" for k in runs[0] if k not in ("seed", "seconds")
            )
        )
    return results


# -- report ----------------------------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> str:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return f"{arr.mean():.3f}"
    return f"{arr.mean():.3f} ± {arr.std(ddof=1) / np.sqrt(len(arr)):.3f}"


def report(pools: dict[str, Any], results: dict[str, dict[str, Any]], output: Path) -> None:
    lines = [
        "# Quality awareness: do selectors pick strong systems' answers / correct solutions?",
        "",
        f"Date: {date.today().isoformat()}. Machine: 2-core CPU (shared), no GPU. Budget: {BUDGET:.0%} of each "
        f"pool; {len(SEEDS)} seeds for seeded methods (mean ± standard error), one run for deterministic ones.",
        "",
        "Command: `python benchmarks/bench_quality_awareness.py` (caches under /work/cache/hf_dataselect/quality).",
        "",
        "Quality columns given to kMQ (sampling ∝ exp(q) inside clusters) and Deita (quality order + cosine "
        "redundancy filter τ = 0.9), each z-scored over the pool:",
        "",
        "| scorer | kind | what it is |",
        "|---|---|---|",
        "| none | – | the selector gets no quality column |",
        "| length | heuristic | response length in characters |",
        "| compression | heuristic | zlib-compressed size / raw size of the response (low = repetitive) |",
        "| ref_ppl | model (trained here) | − log perplexity of the response given the prompt under a ~1M-parameter "
        "Llama trained from scratch for 3 epochs on a reference corpus (LIMA answers for *systems*, 3,000 GSM8K "
        "train solutions for *gsm8k*) |",
        "| oracle | the hidden label | system quality rank / `is_correct`: an upper bound, not a scorer |",
        "",
        "No pretrained reward model or LLM judge can run offline on this machine, so the scorer the kMQ paper "
        "relies on (a reward model) is **not measured here**; `hf_dataselect.transforms.quality.RewardScores` runs "
        "any such model where one is available.",
        "",
    ]
    if "systems" in results:
        pool = pools["systems"]
        base_strong = np.isin(pool["system"], list(STRONG)).mean()
        base_weak = np.isin(pool["system"], list(WEAK)).mean()
        lines += [
            f"## Self-Instruct user prompts × 8 systems ({len(pool)} rows; {BUDGET:.0%} = "
            f"{round(BUDGET * len(pool))} rows)",
            "",
            f"Pool base rates: strong (text-davinci-001/002/003) {base_strong:.3f}, weak (davinci, davinci-t0-ft, "
            f"davinci-superni-ft) {base_weak:.3f}, mean quality rank {np.mean([SYSTEMS[s] for s in pool['system']]):.2f}"
            " (0 = davinci … 4 = text-davinci-002/003).",
            "",
            "| selector | quality column | share strong | share weak | mean rank | distinct prompts |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for entry in results["systems"].values():
            runs = entry["runs"]
            lines.append(
                f"| {entry['method']} | {entry['scorer']} | {_mean_se([r['strong'] for r in runs])} | "
                f"{_mean_se([r['weak'] for r in runs])} | {_mean_se([r['rank'] for r in runs])} | "
                f"{_mean_se([r['items'] for r in runs])} |"
            )
        lines.append("")
    if "gsm8k" in results:
        pool = pools["gsm8k"]
        lines += [
            f"## GSM8K model solutions with `is_correct` ({len(pool)} rows; {BUDGET:.0%} = "
            f"{round(BUDGET * len(pool))} rows)",
            "",
            f"Pool base rate: correct {np.mean(pool['correct']):.3f}.",
            "",
            "| selector | quality column | share correct | distinct questions |",
            "|---|---|---:|---:|",
        ]
        for entry in results["gsm8k"].values():
            runs = entry["runs"]
            lines.append(
                f"| {entry['method']} | {entry['scorer']} | {_mean_se([r['correct'] for r in runs])} | "
                f"{_mean_se([r['items'] for r in runs])} |"
            )
        lines.append("")
    lines += kept_interpretation(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    log(f"report: {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the shared data folder (default: %(default)s)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--pools", nargs="+", default=["systems", "gsm8k"], choices=["systems", "gsm8k"])
    parser.add_argument("--output", type=Path, default=RESULTS_MD)
    parser.add_argument(
        "--methods", nargs="+", default=list(PLAIN_METHODS), help="selectors run without quality"
    )
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(
            f"error: {args.data} does not exist (the shared data ships in ../shared/data); pass --data.",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.cache.mkdir(parents=True, exist_ok=True)
    pools, results = {}, {}
    for name in args.pools:
        with_sae = any(m.startswith("sae-") for m in args.methods)
        pools[name] = prepared_pool(name, args.data, args.cache, with_sae)
        results[name] = run_selections(name, pools[name], args.cache, args.methods)
    report(pools, results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
