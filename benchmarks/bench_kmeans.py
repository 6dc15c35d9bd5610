"""k-means at scale: our ``fit_kmeans`` vs faiss used directly vs scikit-learn MiniBatchKMeans, and the whole
``select(ds, method="kmq", k=...)`` on a dataset with a precomputed ``embedding`` column.

Data: a synthetic Gaussian mixture of L2-normalised vectors (the shape of sentence embeddings), generated
deterministically from ``--seed``; no files from ``../shared`` are needed. Every configuration runs in its own
subprocess so that its peak memory (``VmHWM``: resident set high-water mark, file-backed pages included) is
its own. Each configuration's time is the wall-clock time of the call alone (data loading excluded), with
the CPU time (user + system, all threads) of the same span beside it: on a shared machine, wall-clock time
also measures the other users, CPU time much less so. Every inertia is the sum of squared distances of *all*
points to the final centroids, computed the same way.

    python benchmarks/bench_kmeans.py --rows 1000000 --dim 384 --k 1024 --output benchmarks/results/kmeans.md

This is long on 2 cores; run it in the background (see CONVENTIONS.md) and follow the progress log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

CONFIGS = ("faiss", "fit_kmeans", "fit_kmeans_torch", "sklearn_minibatch", "select_kmq")
DEFAULT_CONFIGS = ("faiss", "select_kmq", "fit_kmeans", "sklearn_minibatch")


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_data(rows: int, dim: int, components: int, seed: int) -> np.ndarray:
    """Unit vectors around ``components`` random directions with Zipf-like component sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, components + 1) ** 0.5
    labels = rng.choice(components, size=rows, p=weights / weights.sum())
    x = np.empty((rows, dim), dtype=np.float32)
    spread = 1.2 / np.sqrt(dim)  # within-component cosine to the centre ≈ 0.6
    for start in range(0, rows, 100_000):
        part = labels[start : start + 100_000]
        block = centres[part] + spread * rng.standard_normal((len(part), dim), dtype=np.float32)
        x[start : start + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def prepare(workdir: Path, rows: int, dim: int, components: int, seed: int) -> tuple[Path, Path]:
    """Write the vectors as .npy and as a ``save_to_disk`` dataset with an ``embedding`` column (cached)."""
    import pyarrow as pa
    from datasets import Dataset

    tag = f"{rows}x{dim}_c{components}_s{seed}"
    npy, folder = workdir / f"x_{tag}.npy", workdir / f"ds_{tag}"
    if npy.exists() and (folder / "dataset_info.json").exists():
        return npy, folder
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"generating {rows}x{dim} vectors ({components} components)")
    x = make_data(rows, dim, components, seed)
    np.save(npy, x)
    # the column type `ds.map(Embeddings(), batched=True)` produces: list<float32>
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
    table = pa.table({"id": pa.array(np.arange(rows, dtype=np.int64)), "embedding": embedding})
    Dataset(table).save_to_disk(str(folder))
    return npy, folder


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def timed(result: dict, started: float, cpu_started: float) -> None:
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = cpu_seconds() - cpu_started
    result["loadavg_after"] = os.getloadavg()[0]


def inertia_of(x: np.ndarray, centroids: np.ndarray) -> float:
    from hf_dataselect.cluster import KMeans

    model = KMeans(centroids=centroids, inertia=float("nan"), seed=0, backend="-", niter=0, n_train=0)
    _, distances = model.assign(x)
    return float(np.square(distances, dtype=np.float64).sum())


def run_one(config: str, args: argparse.Namespace, npy: Path, folder: Path) -> dict:
    """One configuration, in this (sub)process; returns its timing and inertia."""
    result: dict = {"config": config}
    if config == "select_kmq":
        from datasets import load_from_disk

        from hf_dataselect import select

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        dataset = load_from_disk(str(folder))
        result["loadavg_before"] = os.getloadavg()[0]
        started, cpu_started = time.perf_counter(), cpu_seconds()
        selection = select(
            dataset, "kmq", budget=args.budget, seed=args.seed, k=args.k, kmeans_niter=args.niter
        )
        timed(result, started, cpu_started)
        result["inertia"] = selection.info["clustering"]["inertia"]
        result["rows_selected"] = len(selection)
        result["peak_rss_mb"] = peak_rss_mb()
        return result

    x = np.load(npy)
    result["loadavg_before"] = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if config == "faiss":
        import faiss

        kmeans = faiss.Kmeans(
            x.shape[1],
            args.k,
            niter=args.niter,
            seed=args.seed,
            max_points_per_centroid=-(-len(x) // args.k),  # every point, as fit_kmeans does
            min_points_per_centroid=1,
            verbose=True,
        )
        kmeans.train(x)
        centroids = np.asarray(kmeans.centroids)
        timed(result, started, cpu_started)
        result["simd_level"] = faiss.SIMDConfig.get_level_name()
        result["inertia"] = inertia_of(x, centroids)
    elif config in ("fit_kmeans", "fit_kmeans_torch"):
        from hf_dataselect.cluster import fit_kmeans

        backend = "torch" if config == "fit_kmeans_torch" else "auto"
        model = fit_kmeans(x, args.k, seed=args.seed, niter=args.niter, backend=backend, verbose=True)
        timed(result, started, cpu_started)
        result["backend"] = model.backend
        result["inertia"] = model.inertia
        result["inertia_recomputed"] = inertia_of(x, model.centroids)
    elif config == "sklearn_minibatch":
        from sklearn.cluster import MiniBatchKMeans

        kmeans = MiniBatchKMeans(
            n_clusters=args.k,
            batch_size=args.sklearn_batch_size,
            max_iter=args.niter,
            n_init=1,
            random_state=args.seed,
            verbose=1,
        )
        kmeans.fit(x)
        timed(result, started, cpu_started)
        result["steps"] = int(kmeans.n_steps_)
        result["inertia"] = inertia_of(x, kmeans.cluster_centers_.astype(np.float32))
    else:
        raise ValueError(config)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def write_markdown(path: Path, args: argparse.Namespace, results: list[dict], command: str) -> None:
    by = {r["config"]: r for r in results}
    reference = by.get("faiss", {}).get("seconds")
    cpu_reference = by.get("faiss", {}).get("cpu_seconds")
    lines = [
        "# k-means at scale",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}",
        f"- Data: {args.rows:,} × {args.dim} float32 unit vectors, Gaussian mixture of {args.components} "
        f"components (seed {args.seed}); k = {args.k}, {args.niter} iterations, every point used for training",
        "",
        "| configuration | wall (s) | × faiss | CPU (s) | × faiss (CPU) | inertia (all points) | peak RSS (MiB) "
        "| load avg before/after | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    notes = {
        "faiss": "faiss.Kmeans directly, max_points_per_centroid = n/k (no subsampling)",
        "fit_kmeans": "hf_dataselect.cluster.fit_kmeans (backend auto → faiss), incl. labels+distances",
        "fit_kmeans_torch": "fit_kmeans(backend='torch'), the fallback without faiss",
        "sklearn_minibatch": f"MiniBatchKMeans(batch_size={args.sklearn_batch_size}, max_iter={args.niter}, n_init=1)",
        "select_kmq": f"select(ds, 'kmq', budget={args.budget}, k={args.k}) on load_from_disk data, end to end",
    }
    for r in results:
        ratio = f"{r['seconds'] / reference:.2f}" if reference else "–"
        cpu_ratio = f"{r['cpu_seconds'] / cpu_reference:.2f}" if cpu_reference else "–"
        load = f"{r['loadavg_before']:.1f} / {r['loadavg_after']:.1f}"
        extra = notes.get(r["config"], "")
        if "steps" in r:
            extra += f"; {r['steps']} mini-batch steps"
        if "simd_level" in r:
            extra += f"; faiss SIMD level {r['simd_level']}"
        lines.append(
            f"| {r['config']} | {r['seconds']:.1f} | {ratio} | {r['cpu_seconds']:.1f} | {cpu_ratio} "
            f"| {r['inertia']:.1f} | {r['peak_rss_mb']:.0f} | {load} | {extra} |"
        )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--components", type=int, default=2000, help="Gaussian components of the data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=None, help="kMQ budget (default: 10%% of rows)")
    parser.add_argument("--sklearn-batch-size", type=int, default=4096)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {CONFIGS}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_dataselect_bench_kmeans"))
    parser.add_argument("--output", type=Path, default=None, help="markdown results file")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results as JSON")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one config here
    args = parser.parse_args(argv)
    args.budget = args.budget or max(1, args.rows // 10)
    npy, folder = prepare(args.workdir, args.rows, args.dim, args.components, args.seed)
    if args.only:
        print(json.dumps(run_one(args.only, args, npy, folder)), flush=True)
        return 0

    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; choose from {CONFIGS}")
        log(f"running {config}")
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", config]
        completed = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        log(f"{config}: {json.dumps(result)}")
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.output:
        write_markdown(args.output, args, results, "python " + " ".join(sys.argv))
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
