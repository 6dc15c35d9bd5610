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
* ``simscale``: ``sae-simscale`` on ``--simscale-rows`` rows with ``--simscale-budget``, δ found automatically
  (or ``--delta``: one pass), with ``--max-latent-frequency`` (stop latents) and ``--sample-size`` (guess δ on
  a seeded sample first; default ``auto`` = the selector's rule, ``none`` = plain bisection). ``--log-level
  DEBUG`` prints progress lines within each pass (the parent passes the case's stderr through).
* ``simscale-walk``: the cost of walking the first ``--walk-rows`` rows of the pool at a fixed ``--delta`` (no
  budget stop): rows accepted, candidate pairs, seconds. For pools where a whole pass is out of reach.
* ``simscale-quality``: auto-δ selections with each ``--compare-frequencies`` value against the exact full-set
  selection: overlap, latents covered, and the full-set Jaccard of the selected pairs.

    python benchmarks/bench_sae_selectors.py --cases greedy,greedy-speedup,simscale
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
        return simscale_case(args)
    if args.case == "simscale-walk":
        return simscale_walk_case(args)
    if args.case == "simscale-quality":
        return simscale_quality_case(args)
    raise SystemExit(f"unknown case {args.case}")


def simscale_case(args: argparse.Namespace) -> dict:
    from hf_dataselect.selection.sae_simscale import default_sample_size, simscale

    features = cached_features(args, args.simscale_rows or args.rows)
    budget = args.simscale_budget
    sample = default_sample_size(features.n_rows) if args.sample_size == "auto" else args.sample_size
    base = peak_rss_gb()
    started = time.perf_counter()
    outcome = simscale(
        features,
        budget,
        delta=args.delta,
        delta_tolerance=args.delta_tolerance,
        max_latent_frequency=args.max_latent_frequency,
        sample_size=sample,
        seed=args.seed,
        num_threads=args.threads,
    )
    seconds = time.perf_counter() - started
    return {
        "case": f"sae-simscale (jaccard, {'given δ' if args.delta is not None else 'auto δ'})",
        "threads": args.threads or "default (one per core)",
        "rows": features.n_rows,
        "budget": budget,
        "max_latent_frequency": args.max_latent_frequency,
        "sample_size": sample,
        "seconds": seconds,
        "load_average": os.getloadavg()[0],
        "peak_rss_gb": peak_rss_gb(),
        "rss_before_gb": base,
        "delta": outcome.final.delta,
        "full_passes": len(outcome.steps),
        "passes": outcome.steps,
        "sample_passes": outcome.sample_steps,
        "selected": len(outcome.final.positions),
    }


def simscale_walk_case(args: argparse.Namespace) -> dict:
    from hf_dataselect.selection.sae_simscale import SimScaleIndex, simscale_pass

    features = cached_features(args, args.simscale_rows or args.rows)
    index = SimScaleIndex.build(features, "jaccard", args.max_latent_frequency)
    walked = index.take(np.arange(min(args.walk_rows, index.n)))
    started = time.perf_counter()
    outcome = simscale_pass(walked, args.delta, walked.n, num_threads=args.threads)
    return {
        "case": "sae-simscale walk (jaccard, fixed δ)",
        "rows": features.n_rows,
        "max_latent_frequency": args.max_latent_frequency,
        "informative_latents_per_row": float(index.sizes.mean()),
        "delta": args.delta,
        "walked": walked.n,
        "accepted": len(outcome.positions),
        "candidate_pairs": outcome.candidate_pairs,
        "verified_pairs": outcome.verified_pairs,
        "seconds": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],
        "peak_rss_gb": peak_rss_gb(),
    }


def simscale_quality_case(args: argparse.Namespace) -> dict:
    """Stop-latent selections against the exact full-set one, on the same pool and budget."""
    from hf_dataselect.selection.sae_simscale import simscale

    features = cached_features(args, args.simscale_rows or args.rows)
    budget = args.simscale_budget
    rng = np.random.default_rng(args.seed)
    selections = {"random": rng.choice(features.n_rows, size=budget, replace=False)}
    deltas, seconds = {}, {}
    for frequency in [None, *args.compare_frequencies]:
        started = time.perf_counter()
        outcome = simscale(
            features, budget, max_latent_frequency=frequency, delta_tolerance=args.delta_tolerance
        )
        seconds[str(frequency)] = time.perf_counter() - started
        selections[str(frequency)] = outcome.final.positions
        deltas[str(frequency)] = outcome.final.delta
    exact = set(selections["None"].tolist())
    report = {}
    for name, rows in selections.items():
        similarities = full_set_jaccard_of_pairs(features, rows, rng, pairs=args.quality_pairs)
        report[name] = {
            "delta": deltas.get(name),
            "seconds": seconds.get(name),
            "overlap_with_exact": len(exact & set(rows.tolist())) / budget,
            "latents_covered": int(features.covered(rows).sum()),
            "full_jaccard_mean": float(similarities.mean()),
            "full_jaccard_p99": float(np.quantile(similarities, 0.99)),
            "share_above_exact_delta": float(np.mean(similarities >= deltas["None"])),
        }
    return {
        "case": "sae-simscale quality (stop latents vs full set)",
        "rows": features.n_rows,
        "budget": budget,
        "selections": report,
    }


def full_set_jaccard_of_pairs(
    features: SparseFeatures, rows: np.ndarray, rng: np.random.Generator, *, pairs: int
) -> np.ndarray:
    """Jaccard on the full latent sets of random pairs of distinct selected rows."""
    first, second = rng.integers(0, len(rows), size=(2, pairs))
    keep = first != second
    values = []
    for a, b in zip(rows[first[keep]], rows[second[keep]], strict=True):
        x, y = features.row(int(a)), features.row(int(b))
        shared = len(np.intersect1d(x, y, assume_unique=True))
        values.append(shared / (len(x) + len(y) - shared))
    return np.asarray(values)


def optional_float(value: str) -> float | None:
    return None if value == "none" else float(value)


def sample_size(value: str) -> int | str | None:
    return value if value == "auto" else None if value == "none" else int(value)


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
    parser.add_argument("--delta", type=float, help="simscale: a given δ (one pass); simscale-walk: the δ")
    parser.add_argument(
        "--max-latent-frequency", type=optional_float, default=None, help="stop latents (none: every latent)"
    )
    parser.add_argument(
        "--sample-size",
        type=sample_size,
        default="auto",
        help="simscale: rows of the sample that guesses δ first: a count, 'auto' (the selector's rule), 'none'",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="simscale: probe threads (default: per core)"
    )
    parser.add_argument("--walk-rows", type=int, default=100_000)
    parser.add_argument(
        "--compare-frequencies", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.1]
    )
    parser.add_argument("--quality-pairs", type=int, default=20_000)
    parser.add_argument("--cases", default="greedy,greedy-speedup,simscale")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="INFO: one line per SimScale pass; DEBUG: also progress within a pass",
    )
    parser.add_argument("--json", type=Path, help="append each case's result as a JSON line to this file")
    args = parser.parse_args()
    if args.case:
        # progress of the SimScale passes goes to stderr, which the parent passes through (live logs)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(message)s", stream=sys.stderr)
        print(json.dumps(run_case(args)), flush=True)
        return
    for case in args.cases.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--case", case]
        finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        if finished.returncode != 0:
            print(f"{case}: failed (exit {finished.returncode}; its stderr is above)", flush=True)
            continue
        line = finished.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if args.json:
            with args.json.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
