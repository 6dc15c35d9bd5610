"""DataSelectionCallback: its own overhead per epoch, and the scoring cost per row of each scorer.

1. **Overhead.** SFTTrainer trains a small random-init Llama for ``--epochs`` epochs of ``--budget`` rows drawn
   from a real pool (default: the 45k-row T0 pool under ``../shared/data``) with the callback attached. The
   callback's methods and its sampler are wrapped with timers; the time spent inside the scorer is
   subtracted, so "overhead" is selection, bookkeeping, JSON files and checkpoint copies. It is compared with
   the epoch's wall time (excluding scoring), measured in the same run. A cheap callable scorer is used here,
   since scoring is measured separately (part 2). Clusters come from a ``cluster`` column computed once
   beforehand (hashed bag-of-words → SVD → ``fit_kmeans``), because one-time set-up is not per-epoch cost.
2. **Scoring.** Each scorer (``loss``, ``perplexity``, ``reward``) scores ``--score-rows`` GSM8K rows with the
   same small Llama (and a reward model of the same shape); generation is forced to exactly
   ``--max-new-tokens`` tokens (``min_new_tokens``), since a random-init model would otherwise stop at once.

    python benchmarks/bench_callback.py --output benchmarks/results/callback.json

Long on 2 cores: run it in the background under the heavy lock (CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
T0_GLOB = "self_instruct/data/finetuning/t0_train_50k/data_per_template/*.jsonl"
GSM8K = "gsm8k/grade_school_math/data/train.jsonl"


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_t0(data: Path, max_rows: int | None):
    from datasets import load_dataset

    files = sorted(str(p) for p in data.glob(T0_GLOB))
    if not files:
        raise SystemExit(f"No T0 files under {data}/{T0_GLOB}; pass --data.")
    pool = load_dataset("json", data_files=files, split="train")
    pool = pool.map(lambda row: {"completion": row["completion"].replace("<|endoftext|>", "").strip()})
    pool = pool.filter(lambda row: bool(row["prompt"].strip()) and bool(row["completion"]))
    if max_rows is not None and max_rows < len(pool):
        pool = pool.shuffle(seed=0).select(range(max_rows))
    return pool.add_column("row_id", list(range(len(pool))))


def add_clusters(pool, k: int):
    """A cheap but real clustering: hashed bag-of-words → 64-d SVD → k-means (fit_kmeans)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer

    from hf_dataselect.cluster import fit_kmeans

    texts = [p + "\n\n" + c for p, c in zip(pool["prompt"], pool["completion"], strict=True)]
    counts = HashingVectorizer(n_features=2**18, alternate_sign=False, norm="l2").transform(texts)
    x = TruncatedSVD(64, random_state=0).fit_transform(counts).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    model = fit_kmeans(x, k, seed=0)
    return pool.add_column("cluster", model.labels.tolist())


def build_models(workdir: Path, corpus: list[str], hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    from hf_dataselect.testing import build_tiny_causal_lm, build_tiny_reward_model

    policy = build_tiny_causal_lm(
        workdir / "policy", corpus=corpus, vocab_size=vocab, hidden_size=hidden, num_layers=layers
    )
    reward = build_tiny_reward_model(
        workdir / "reward", corpus=corpus, vocab_size=vocab, hidden_size=hidden, num_layers=layers
    )
    return policy, reward


def parameter_count(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(path)).parameters())


def overhead_run(pool, policy: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_dataselect.training import DataSelectionCallback

    def cheap_scorer(prompts, responses):  # scoring is benchmarked separately
        return [len(r) / 100.0 for r in responses]

    selection = DataSelectionCallback(budget_per_epoch=args.budget, scorer=cheap_scorer, seed=0)
    config = SFTConfig(
        output_dir=str(workdir / "run"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        use_cpu=True,
        report_to="none",
        save_strategy="epoch",
        save_only_model=True,
        logging_steps=10_000,
        max_length=args.max_length,
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataset_num_proc=1,
    )
    log(f"Tokenizing {len(pool)} rows for SFTTrainer")
    trainer = SFTTrainer(model=str(policy), args=config, train_dataset=pool, callbacks=[selection])
    started = time.perf_counter()
    selection.attach(trainer)
    attach_seconds = time.perf_counter() - started

    per_epoch: list[dict[str, float]] = []
    timers: dict[str, float] = {}

    def wrap(name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                elapsed = time.perf_counter() - t0
                timers[name] = timers.get(name, 0.0) + elapsed
                if per_epoch:
                    per_epoch[-1][name] = per_epoch[-1].get(name, 0.0) + elapsed

        return timed

    for name in ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_save", "on_train_end"):
        setattr(selection, name, wrap(name, getattr(selection, name)))
    selection.scorer.fn = wrap("scorer", selection.scorer.fn)
    selection.sampler.order = wrap("sampler", selection.sampler.order)

    class EpochClock(TrainerCallback):
        """First callback of the list: stamps the wall time at each epoch start and at the end of training."""

        def on_epoch_begin(self, a, state, control, **kw):
            per_epoch.append({"start": time.perf_counter()})

        def on_train_end(self, a, state, control, **kw):
            per_epoch.append({"start": time.perf_counter()})

    handler = trainer.callback_handler
    handler.callbacks.insert(0, EpochClock())
    log(f"Training {args.epochs} epochs × {args.budget} rows")
    trainer.train()
    epochs = []
    for index in range(args.epochs):
        this, following = per_epoch[index], per_epoch[index + 1]
        wall = following["start"] - this["start"]
        # an epoch's scoring and end-of-epoch hooks run before the next epoch's clock stamp
        scoring = this.get("scorer", 0.0)
        callback = sum(this.get(n, 0.0) for n in ("on_epoch_begin", "on_epoch_end", "on_save", "sampler"))
        overhead = callback - scoring
        epochs.append(
            {
                "epoch": index,
                "wall_seconds": wall,
                "scoring_seconds": scoring,
                "callback_seconds_excluding_scoring": overhead,
                "overhead_percent": 100.0 * overhead / (wall - scoring),
            }
        )
        log(
            f"epoch {index}: wall {wall:.1f} s, overhead {overhead * 1000:.1f} ms ({epochs[-1]['overhead_percent']:.3f} %)"
        )
    return {
        "pool_rows": len(pool),
        "budget_per_epoch": args.budget,
        "epochs": epochs,
        "attach_seconds": attach_seconds,
        "on_train_begin_seconds": timers.get("on_train_begin", 0.0),
        "steps": trainer.state.global_step,
    }


def scoring_run(policy: Path, reward: Path, args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    from datasets import load_dataset

    from hf_dataselect.models import load_model, load_tokenizer
    from hf_dataselect.training.scorers import make_scorer

    rows = load_dataset("json", data_files=str(data / GSM8K), split="train").select(
        range(args.score_rows + 8)
    )
    prompts, answers = list(rows["question"]), list(rows["answer"])
    model = load_model(str(policy), kind="causal-lm", device="cpu")
    tokenizer = load_tokenizer(str(policy))
    generation = {"min_new_tokens": args.max_new_tokens}
    scorers = {
        "loss": make_scorer("loss", batch_size=8),
        "perplexity": make_scorer(
            "perplexity", batch_size=8, max_new_tokens=args.max_new_tokens, generation_kwargs=generation
        ),
        "reward": make_scorer(
            "reward",
            batch_size=8,
            max_new_tokens=args.max_new_tokens,
            generation_kwargs=generation,
            reward_model=str(reward),
        ),
    }
    from hf_dataselect.scoring import generate_responses

    def generation_only(p, r, model, tokenizer):
        return generate_responses(
            model, tokenizer, p, max_new_tokens=args.max_new_tokens, batch_size=8, **generation
        )

    tasks = {**scorers, "generation only": generation_only}
    for task in tasks.values():  # warm-up (and the reward model's load)
        task(prompts[:8], answers[:8], model=model, tokenizer=tokenizer)
    timings: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(args.repeats):  # interleaved, so a burst of load on the shared CPU hits every scorer
        for name, task in tasks.items():
            started = time.perf_counter()
            out = task(prompts[8:], answers[8:], model=model, tokenizer=tokenizer)
            timings[name].append(time.perf_counter() - started)
            if isinstance(out, dict):
                assert np.isfinite(out["score"]).all()
    results = []
    for name, seconds_list in timings.items():
        seconds = min(seconds_list)
        results.append(
            {
                "scorer": name,
                "rows": args.score_rows,
                "seconds_min": seconds,
                "seconds_all": seconds_list,
                "seconds_per_row": seconds / args.score_rows,
                "rows_per_second": args.score_rows / seconds,
            }
        )
        log(f"{name}: {seconds / args.score_rows * 1000:.1f} ms/row (best of {len(seconds_list)})")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})"
    )
    parser.add_argument("--pool-rows", type=int, default=None, help="use a random subset of the T0 pool")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--score-rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions of each scorer (best is kept)"
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data} does not exist; point it at the shared data folder.")
    log(f"Data: {args.data}")
    import torch

    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pool = load_t0(args.data, args.pool_rows)
        log(f"T0 pool: {len(pool)} rows")
        corpus = [p + " " + c for p, c in zip(pool["prompt"][:5000], pool["completion"][:5000], strict=True)]
        policy, reward = build_models(workdir, corpus, args.hidden, args.layers, args.vocab)
        results["model"] = {
            "architecture": "random-init Llama (hf_dataselect.testing), byte-level BPE trained on 5k pool rows",
            "hidden_size": args.hidden,
            "layers": args.layers,
            "vocab_size": args.vocab,
            "parameters": parameter_count(policy),
        }
        if not args.skip_overhead:
            started = time.perf_counter()
            pool = add_clusters(pool, args.clusters)
            results["clustering_seconds"] = time.perf_counter() - started
            results["overhead"] = overhead_run(pool, policy, args, workdir)
        if not args.skip_scoring:
            results["scoring"] = scoring_run(policy, reward, args, args.data)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
