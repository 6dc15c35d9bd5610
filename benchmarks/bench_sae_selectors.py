"""Scale benchmark of SAE-GreedSelect and SAE-SimScale on synthetic SAE features (issue 4).

Synthetic pools with the SAE paper's shape: ``--rows`` rows over ``--latents`` latents (131,072), 100–300
active latents per row, Zipf-distributed latent frequencies. Two generators:

* ``independent``: every row draws its latents independently from one Zipf(1) law. No structure at all: every
  pair of rows shares about the same ~30 frequent latents, so similarity is low and flat (Jaccard ≈ 0.08).
  The worst case for similarity search, and unlike real text.
* ``topics`` (default): each row belongs to one of ``--topics`` topics (Zipf-sized); half of its draws come
  from its topic's own 400 latents (drawn once from the global Zipf law), half from the global law. Latent
  frequencies stay Zipf-shaped, and rows about the same thing share rare latents, as SAE features of real
  text do.

Measured here (each in the same process, peak memory from ``ru_maxrss`` deltas is not reliable, so each case
runs in a fresh subprocess and reports its own peak RSS):

* ``greedy``: ``sae-greedy`` (inverted algorithm) on the full pool with ``--greedy-budget``.
* ``greedy-speedup``: on ``--speedup-rows`` rows, the inverted and lazy variants against the plain greedy
  (every row re-evaluated at every step), same picks asserted.
* ``simscale``: ``sae-simscale`` with δ found by bisection, ``--simscale-budget``.

    python benchmarks/bench_sae_selectors.py --cases greedy,greedy-speedup,simscale
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_dataselect.selection.sparse_features import SparseFeatures

CACHE = Path("/work/cache/sae_bench")


def synthetic_features(
    rows: int,
    latents: int = 131_072,
    *,
    low: int = 130,
    high: int = 430,
    exponent: float = 1.0,
    generator: str = "topics",
    topics: int = 20_000,
    topic_latents: int = 400,
    seed: int = 0,
    chunk: int = 50_000,
) -> SparseFeatures:
    """Rows of distinct latent ids; ``low..high`` draws per row (duplicates removed: ~100–300 active)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, latents + 1) ** exponent
    cdf = np.cumsum(weights / weights.sum())
    ids = rng.permutation(latents).astype(np.int64)  # frequency rank -> latent id

    def zipf_draw(size: int) -> np.ndarray:
        return ids[np.minimum(np.searchsorted(cdf, rng.random(size)), latents - 1)]

    if generator == "topics":
        topic_sets = zipf_draw(topics * topic_latents).reshape(topics, topic_latents)
        topic_weights = 1.0 / np.arange(1, topics + 1)
        topic_cdf = np.cumsum(topic_weights / topic_weights.sum())
    indptr_parts = [np.zeros(1, dtype=np.int64)]
    index_parts = []
    total = 0
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        draws = rng.integers(low, high + 1, size=m)
        owner = np.repeat(np.arange(m, dtype=np.int64), draws)
        drawn = zipf_draw(int(draws.sum()))
        if generator == "topics":
            topic = np.minimum(np.searchsorted(topic_cdf, rng.random(m)), topics - 1)
            from_topic = rng.random(len(drawn)) < 0.5
            slot = rng.integers(0, topic_latents, size=int(from_topic.sum()))
            drawn[from_topic] = topic_sets[topic[owner[from_topic]], slot]
        keys = np.sort(owner * latents + drawn)
        keep = np.ones(len(keys), dtype=bool)
        keep[1:] = keys[1:] != keys[:-1]
        keys = keys[keep]
        index_parts.append((keys % latents).astype(np.int32))
        indptr_parts.append(total + np.cumsum(np.bincount(keys // latents, minlength=m)))
        total += len(keys)
    return SparseFeatures(np.concatenate(indptr_parts), np.concatenate(index_parts), latents)


def cached_features(args: argparse.Namespace, rows: int) -> SparseFeatures:
    """Generate once, then memory-map from ``/work/cache`` (generation of 1M rows takes about a minute)."""
    name = f"{args.generator}-{rows}-{args.latents}-{args.seed}"
    folder = CACHE / name
    if not (folder / "indices.npy").exists():
        features = synthetic_features(rows, args.latents, generator=args.generator, seed=args.seed)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "indptr.npy", features.indptr)
        np.save(folder / "indices.npy", features.indices)
    indptr = np.load(folder / "indptr.npy")
    indices = np.load(folder / "indices.npy", mmap_mode="r")
    return SparseFeatures(indptr, indices, args.latents)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_case(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: one case, its time and the process's peak memory."""
    from hf_dataselect.selection.sae_greedy import greedy_coverage, plain_greedy_coverage
    from hf_dataselect.selection.sae_simscale import simscale

    if args.case == "greedy":
        features = cached_features(args, args.rows)
        base = peak_rss_gb()
        started = time.perf_counter()
        outcome = greedy_coverage(features, args.greedy_budget, algorithm=args.algorithm)
        seconds = time.perf_counter() - started
        return {
            "case": f"sae-greedy ({args.algorithm})",
            "rows": features.n_rows,
            "entries": features.nnz,
            "budget": args.greedy_budget,
            "seconds": seconds,
            "peak_rss_gb": peak_rss_gb(),
            "rss_before_gb": base,
            "rounds": int(outcome.rounds.max()),
            "latents_covered": int(features.coverage_curve(outcome.positions)[-1]),
        }
    if args.case == "greedy-speedup":
        features = cached_features(args, args.speedup_rows)
        times, picks = {}, {}
        for name in ("inverted", "lazy", "plain"):
            started = time.perf_counter()
            if name == "plain":
                outcome = plain_greedy_coverage(features, args.speedup_budget)
            else:
                outcome = greedy_coverage(features, args.speedup_budget, algorithm=name)
            times[name] = time.perf_counter() - started
            picks[name] = outcome.positions
        same = all(np.array_equal(picks[k], picks["plain"]) for k in picks)
        return {
            "case": "greedy speed-up",
            "rows": features.n_rows,
            "budget": args.speedup_budget,
            "seconds": times,
            "identical_picks": same,
            "speedup_inverted": times["plain"] / times["inverted"],
            "speedup_lazy": times["plain"] / times["lazy"],
            "peak_rss_gb": peak_rss_gb(),
        }
    if args.case == "simscale":
        features = cached_features(args, args.simscale_rows or args.rows)
        base = peak_rss_gb()
        started = time.perf_counter()
        outcome = simscale(features, args.simscale_budget, delta_tolerance=args.delta_tolerance)
        seconds = time.perf_counter() - started
        return {
            "case": "sae-simscale (jaccard, auto δ)",
            "rows": features.n_rows,
            "budget": args.simscale_budget,
            "seconds": seconds,
            "peak_rss_gb": peak_rss_gb(),
            "rss_before_gb": base,
            "delta": outcome.final.delta,
            "passes": outcome.steps,
            "selected": len(outcome.final.positions),
        }
    raise SystemExit(f"unknown case {args.case}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--latents", type=int, default=131_072)
    parser.add_argument("--generator", choices=("topics", "independent"), default="topics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy-budget", type=int, default=10_000)
    parser.add_argument("--algorithm", choices=("inverted", "lazy"), default="inverted")
    parser.add_argument("--speedup-rows", type=int, default=20_000)
    parser.add_argument("--speedup-budget", type=int, default=1_000)
    parser.add_argument("--simscale-budget", type=int, default=100_000)
    parser.add_argument("--simscale-rows", type=int, help="pool size of the simscale case (default: --rows)")
    parser.add_argument("--delta-tolerance", type=float, default=5e-3)
    parser.add_argument("--cases", default="greedy,greedy-speedup,simscale")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="append each case's result as a JSON line to this file")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return
    for case in args.cases.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--case", case]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            print(f"{case}: failed\n{finished.stderr[-3000:]}", flush=True)
            continue
        line = finished.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if args.json:
            with args.json.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
