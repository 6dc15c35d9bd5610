"""SAE benchmarks (a) reconstruction quality and (b) training speed against EleutherAI sparsify.

(a) Train a TopK SAE (width 16 x 384 = 6144, k = 32) on all-MiniLM-L6-v2 activations (last block) of real
    text: LIMA (train split) + a seeded sample of the T0 pool, 10 % of the rows held out. Report FVU (train and
    held out), L0, dead latents, tokens seen, time.
(b) Tokens/s of one training step on the *same* cached activations (fixed batches of --batch-tokens tokens),
    same width, k, batch and AuxK weight, each implementation in its own process, in alternating rounds:
    ours, EleutherAI sparsify (eai-sparsify in its own venv, --sparsify-python) and a naive dense PyTorch TopK.

    python benchmarks/bench_sae_training.py --output benchmarks/results/sae_training.json

Data defaults to ../shared/data (/work/shared/data); the script says so and stops when it is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sae_common import LIMA, T0_DIR, check_data, lima_rows, t0_rows, texts_of  # noqa: E402


def run_quality(args) -> dict:
    import datasets

    from hf_dataselect.sae.train import SAETrainingConfig, train_sae

    rows = lima_rows(args.lima)[: args.lima_rows]
    t0 = t0_rows(args.t0_dir, args.t0_rows, args.seed)
    texts = texts_of(rows) + texts_of(t0)
    pool = datasets.Dataset.from_dict({"text": texts})
    config = SAETrainingConfig(
        expansion_factor=16,
        k=32,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        lr_decay_fraction=args.lr_decay_fraction,
        max_tokens=args.train_tokens,
        eval_fraction=0.1,
        max_length=args.max_length,
        seed=args.seed,
        log_every=25,
    )
    start = time.perf_counter()
    sae = train_sae(
        None,
        pool,
        args.hookpoint,
        config=config,
        checkpoint_dir=args.work / "checkpoint",
        resume=(args.work / "checkpoint" / "checkpoint" / "state.json").is_file(),
        output_dir=args.work / "sae",
        dataset_name="LIMA train + T0 sample",
    )
    elapsed = time.perf_counter() - start
    meta = dict(sae.metadata)
    meta["seconds"] = elapsed
    meta["rows_lima"] = len(rows)
    meta["rows_t0"] = len(t0)
    meta["history"] = sae.training_history
    return meta


def speed_batches(args) -> Path:
    """Fixed batches drawn from the activation cache of (a), shared by every implementation."""
    from hf_dataselect.sae.store import DiskActivations

    folder = args.work / "checkpoint" / "activations"
    info = json.loads((folder / DiskActivations.INFO).read_text())
    cache = DiskActivations(folder, info)
    rng = np.random.default_rng(args.seed + 1)
    steps = args.speed_steps + args.speed_warmup
    out = np.empty((steps, args.batch_tokens, cache.d_in), dtype=np.float32)
    for i in range(steps):
        out[i] = cache.rows(rng.choice(cache.num_tokens, args.batch_tokens, replace=False))
    path = args.work / "speed_batches.npy"
    np.save(path, out)
    return path


def run_speed(args, batches: Path) -> dict:
    script = HERE / "bench_sae_step_speed.py"
    pythons = {"ours": sys.executable, "naive": sys.executable, "sparsify": args.sparsify_python}
    results: dict[str, dict[str, list]] = {}
    for dead in args.dead_fractions:
        per_impl: dict[str, list] = {name: [] for name in pythons}
        for round_index in range(args.rounds):
            order = list(pythons) if round_index % 2 == 0 else list(reversed(pythons))
            for name in order:
                out = args.work / f"speed_{name}_{dead}_{round_index}.json"
                command = [
                    pythons[name], str(script), "--impl", name, "--batches", str(batches),
                    "--warmup", str(args.speed_warmup), "--dead-fraction", str(dead), "--out", str(out),
                ]  # fmt: skip
                if args.threads:
                    command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    per_impl[name].append({"error": done.stderr[-2000:]})
                    print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                per_impl[name].append(json.loads(out.read_text()))
                print(
                    f"dead={dead} round {round_index} {name}: {per_impl[name][-1]['tokens_per_s']:.0f} tokens/s"
                )
        results[str(dead)] = per_impl
    return results


def summarize_speed(results: dict) -> dict:
    summary = {}
    for dead, per_impl in results.items():
        medians = {
            name: statistics.median(r["tokens_per_s"] for r in runs if "tokens_per_s" in r)
            for name, runs in per_impl.items()
            if any("tokens_per_s" in r for r in runs)
        }
        summary[dead] = {
            "tokens_per_s": medians,
            "ours_vs_sparsify": medians.get("ours", 0) / medians["sparsify"]
            if "sparsify" in medians
            else None,
            "ours_vs_naive": medians.get("ours", 0) / medians["naive"] if "naive" in medians else None,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lima", type=Path, default=LIMA)
    parser.add_argument("--t0-dir", type=Path, default=T0_DIR)
    parser.add_argument("--lima-rows", type=int, default=None, help="default: all 1,030 training rows")
    parser.add_argument("--t0-rows", type=int, default=2000)
    parser.add_argument("--hookpoint", default=None, help="default: the last block (encoder.layer.5)")
    parser.add_argument("--max-length", type=int, default=None, help="default: MiniLM's 512 positions")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--train-tokens", type=int, default=4_000_000)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: the library's 1/sqrt(width) rule)",
    )
    parser.add_argument(
        "--lr-decay-fraction", type=float, default=0.2, help="final fraction of the run with linear lr decay"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_dataselect_bench_sae"))
    parser.add_argument("--sparsify-python", default="/work/venv-sparsify/bin/python")
    parser.add_argument("--speed-steps", type=int, default=12)
    parser.add_argument("--speed-warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dead-fractions", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (training and speed runs)")
    parser.add_argument(
        "--skip-quality", action="store_true", help="reuse the activation cache of a former run"
    )
    parser.add_argument("--skip-speed", action="store_true", help="only (a), no speed comparison")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sae_training.json")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    check_data(args.lima, args.t0_dir)
    print(f"Data: {args.lima} and {args.t0_dir} (../shared/data)")
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    if not args.skip_quality:
        report["quality"] = run_quality(args)
        q = report["quality"]
        print(
            f"(a) FVU {q['fvu']:.4f} (held out {q['eval_fvu']:.4f}), L0 {q['l0']:.1f}, dead {q['dead_fraction']:.3%} "
            f"(never fired on held-out: {q['eval_dead_fraction']:.3%}), {q['training_tokens']:,} tokens, "
            f"{q['seconds']:.0f} s"
        )
    if not args.skip_speed:
        batches = speed_batches(args)
        raw = run_speed(args, batches)
        report["speed_raw"] = raw
        report["speed"] = summarize_speed(raw)
        print("(b)", json.dumps(report["speed"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
