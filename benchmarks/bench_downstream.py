"""Downstream proxy: does a model trained on a method's subset beat one trained on a random subset?

Pool: the T0 per-template files of ``../shared/data`` (template = hidden label), made imbalanced and held apart
from two evaluation sets: rows of the pool's templates that are not in the pool (in-distribution), and whole
templates that are not in the pool at all (transfer). Each method selects 5 % and 20 % of the pool; the same
small Llama (from scratch, fixed tokenizer, optimiser and number of steps) trains on each subset; the held-out
response loss per template, macro-averaged over templates, is measured at several epochs of the same run.

Stages (each heavy step is a separate ``flock /tmp/hf_dataselect_heavy.lock`` subprocess, so other heavy jobs
on the machine interleave; everything is cached under ``--cache`` and skipped when present, so the benchmark
resumes where it stopped)::

    python benchmarks/bench_downstream.py all            # prepare, features, select, train, report
    python benchmarks/bench_downstream.py report         # tables from whatever runs have finished

Run it in the background: ``nohup python benchmarks/bench_downstream.py all > /tmp/downstream.log 2>&1 &``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downstream_common import (
    DEFAULT_CACHE,
    END_MARKER,
    LOCK,
    T0_DIR,
    ModelSetup,
    PoolSetup,
    kept_interpretation,
    log,
    read_jsonl,
    setup_dict,
    write_json,
    write_jsonl,
)

BUDGETS = {"5pct": 0.05, "20pct": 0.20}
# About the same number of optimiser steps for both budgets: 6 epochs of 5 % (~230 steps) and 2 epochs of 20 %
# (~305). A first 12-epoch run at 5 % overfitted after epoch 6 (held-out macro loss 4.23 at epoch 6, 4.47 at 12).
EPOCHS = {"5pct": 6, "20pct": 2}
EVAL_EPOCHS = {"5pct": [2, 4, 6], "20pct": [1, 2]}
SEEDS = (0, 1, 2, 3, 4)
STOCHASTIC = ("random", "kmq", "kcenter")
"""Methods whose selection depends on the seed: 5 selection seeds each (the training seed follows the seed)."""
DETERMINISTIC = ("longest", "sae-greedy", "sae-simscale")
"""Methods that select the same rows for every seed: one selection, trained once (training seed 0)."""
NOISE_SEEDS = (101, 102)
"""Extra training seeds on random's seed-0 selection (5 % budget): the training-seed noise floor."""
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "kmq": {},  # kM-Random: no quality column exists for T0 (gold answers); k by silhouette
    "kcenter": {},
    "longest": {},
    "random": {},
    "sae-greedy": {},
    "sae-simscale": {},
}
RESULTS_MD = Path(__file__).resolve().parent / "results" / "downstream.md"
SAE_MAX_TOKENS = 128
"""SAE features read the first 128 MiniLM tokens of a row (the CPU budget; embeddings read 256)."""


# -- stage 1: pool, evaluation sets, tokenizer ---------------------------------------------------------------
def read_t0(data: Path) -> dict[str, list[dict[str, str]]]:
    templates: dict[str, list[dict[str, str]]] = {}
    for path in sorted(data.glob("*.jsonl")):
        rows = []
        for row in read_jsonl(path):
            completion = row["completion"].replace(END_MARKER, "").strip()
            prompt = row["prompt"]
            if prompt.strip() and completion:
                rows.append({"prompt": prompt, "completion": completion})
        if rows:
            templates[path.stem] = rows
    return templates


def build_pool(data: Path, cache: Path) -> None:
    """pool.jsonl (+ truncated training text), eval_inpool.jsonl, eval_transfer.jsonl, tokenizer/."""
    from transformers import AutoTokenizer

    from hf_dataselect.testing import build_tokenizer

    if (cache / "pool.jsonl").is_file():
        log("pool: cached")
        return
    setup = PoolSetup()
    rng = np.random.default_rng(setup.seed)
    templates = read_t0(data)
    names = sorted(templates)
    eligible = [n for n in names if len(templates[n]) >= 20]
    transfer = sorted(rng.choice(eligible, size=setup.transfer_templates, replace=False).tolist())
    pool, inpool_eval, transfer_eval = [], [], []
    for name in names:
        rows = templates[name]
        order = rng.permutation(len(rows))
        if name in transfer:
            transfer_eval += [
                {**rows[i], "template": name} for i in order[: setup.transfer_rows_per_template]
            ]
            continue
        n_eval = min(setup.inpool_eval_rows_per_template, len(rows) // 4)
        inpool_eval += [{**rows[i], "template": name} for i in order[:n_eval]]
        rest = order[n_eval:]
        share = float(np.exp(rng.uniform(np.log(setup.min_share), 0.0)))
        keep = max(1, round(share * len(rest)))
        pool += [{**rows[i], "template": name} for i in rest[:keep]]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    for number, row in enumerate(pool):
        row["id"] = f"t0-{number:05d}"

    log(
        f"pool: {len(pool)} rows, {len({r['template'] for r in pool})} templates; eval in-pool "
        f"{len(inpool_eval)} rows, transfer {len(transfer_eval)} rows ({len(transfer)} templates)"
    )
    corpus = [f"{r['prompt']}\n\n{r['completion']}" for r in pool]
    build_tokenizer(cache / "tokenizer", corpus, vocab_size=ModelSetup().vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    for rows in (pool, inpool_eval, transfer_eval):
        truncate_for_training(rows, tokenizer, setup)
    write_jsonl(cache / "eval_inpool.jsonl", inpool_eval)
    write_jsonl(cache / "eval_transfer.jsonl", transfer_eval)
    write_json(cache / "pool_meta.json", {"setup": setup_dict(), "transfer_templates": transfer})
    write_jsonl(cache / "pool.jsonl", pool)


def truncate_for_training(rows: list[dict[str, Any]], tokenizer: Any, setup: PoolSetup) -> None:
    """Add ``train_prompt``/``train_completion``: the text fits ``max_tokens`` with the chat template.

    Selectors see the full rows; only the proxy model's context is limited. Long prompts lose their start
    (T0 puts the question at the end), completions keep their first ``max_completion_tokens`` tokens.
    """
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenize=False
    )
    overhead = len(tokenizer(template, add_special_tokens=False)["input_ids"]) + 2
    for row in rows:
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids[: setup.max_completion_tokens]
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        room = setup.max_tokens - overhead - len(completion_ids)
        row["train_prompt"] = (
            tokenizer.decode(prompt_ids[-room:]) if len(prompt_ids) > room else row["prompt"]
        )
        row["train_completion"] = (
            tokenizer.decode(completion_ids)
            if len(completion_ids) < len(row["completion"])
            else row["completion"]
        )
        if not row["train_completion"].strip():
            row["train_completion"] = row["completion"][:200]


# -- stage 2: features ---------------------------------------------------------------------------------------
def features(cache: Path, with_sae: bool) -> None:
    """The pool with MiniLM embeddings (and SAE features when available), saved under cache/features."""
    import datasets

    from hf_dataselect.transforms.embed import Embeddings

    target = cache / "features"
    if (target / "dataset_info.json").is_file():
        pool = datasets.load_from_disk(str(target))
    else:
        pool = datasets.load_dataset("json", data_files=str(cache / "pool.jsonl"), split="train")
        started = time.perf_counter()
        known = reusable_embeddings(pool)
        if known is not None:
            pool = pool.add_column("embedding", known)
            log(f"features: reused the MiniLM embeddings of {REUSABLE_EMBEDDINGS}")
        else:
            pool = pool.map(Embeddings(), batched=True, batch_size=1000, desc="Embedding")
            log(f"features: embeddings of {len(pool)} rows in {time.perf_counter() - started:.0f} s")
        _save(pool, target)
    if with_sae and "sae_indices" not in pool.column_names:
        if not sae_available():
            log("features: SAE features skipped (add_sae_features or the SAE selectors are not available)")
            return
        from hf_dataselect.transforms.sae_features import add_sae_features

        started = time.perf_counter()
        pool = add_sae_features(pool, cache_dir=str(cache / "sae"), sae="auto", max_length=SAE_MAX_TOKENS)
        log(f"features: SAE features in {time.perf_counter() - started:.0f} s")
        _save(pool, target)


# The coverage benchmark embeds every T0 row with the same encoder and the same text (prompt + "\n\n" +
# completion without the end marker); when its cache exists, its vectors are reused instead of recomputed.
REUSABLE_EMBEDDINGS = Path("/work/cache/coverage/t0_pool_embedded")


def reusable_embeddings(pool: Any) -> list[list[float]] | None:
    import datasets

    if not (REUSABLE_EMBEDDINGS / "dataset_info.json").is_file():
        return None
    other = datasets.load_from_disk(str(REUSABLE_EMBEDDINGS))
    if not {"prompt", "completion", "embedding"} <= set(other.column_names):
        return None
    index = {(p, c): i for i, (p, c) in enumerate(zip(other["prompt"], other["completion"], strict=True))}
    positions = [index.get((p, c)) for p, c in zip(pool["prompt"], pool["completion"], strict=True)]
    if any(p is None for p in positions):
        return None
    return other.select(positions)["embedding"]


def _save(pool: Any, target: Path) -> None:
    import shutil

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pool.save_to_disk(str(staging))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def sae_available() -> bool:
    try:
        from hf_dataselect.selection import available_methods
        from hf_dataselect.transforms.sae_features import add_sae_features  # noqa: F401
    except ImportError:
        return False
    return {"sae-greedy", "sae-simscale"} <= set(available_methods())


# -- stage 3: selections ------------------------------------------------------------------------------------
def selection_name(method: str, budget: str, seed: int) -> str:
    return f"{method}-{budget}-s{seed}"


def selections(cache: Path, methods: list[str]) -> None:
    import datasets

    from hf_dataselect.selection import select

    pool = datasets.load_from_disk(str(cache / "features"))
    templates = pool["template"]
    out = cache / "selections"
    for budget, fraction in BUDGETS.items():
        for method in methods:
            if method.startswith("sae-") and "sae_indices" not in pool.column_names:
                continue
            for seed in SEEDS if method in STOCHASTIC else (0,):
                path = out / f"{selection_name(method, budget, seed)}.json"
                if path.is_file():
                    continue
                view = pool.remove_columns(["template", "train_prompt", "train_completion"])
                result = select(view, method, fraction, seed=seed, **METHOD_OPTIONS.get(method, {}))
                positions = [int(p) for p in result.positions]
                covered = Counter(templates[p] for p in positions)
                write_json(
                    path,
                    {
                        "method": method,
                        "budget": budget,
                        "seed": seed,
                        "positions": positions,
                        "seconds": result.elapsed_seconds,
                        "templates_covered": len(covered),
                        "info": {k: v for k, v in result.manifest()["info"].items() if k != "coverage_curve"},
                    },
                )
                log(
                    f"select {path.stem}: {len(positions)} rows, {len(covered)} templates, "
                    f"{result.elapsed_seconds:.1f} s"
                )


# -- stage 4: training runs ---------------------------------------------------------------------------------
def plan(cache: Path) -> list[dict[str, Any]]:
    """Every training run, in priority order: the 5 % budget first, seed by seed (deterministic methods with
    seed 0), so that an interrupted benchmark still has balanced results; then 20 %; the noise runs last."""
    runs = []
    for budget in BUDGETS:
        for seed in SEEDS:
            for method in (*DETERMINISTIC, *STOCHASTIC):
                if method in DETERMINISTIC and seed != 0:
                    continue
                selection = cache / "selections" / f"{selection_name(method, budget, seed)}.json"
                runs.append(_spec(cache, method, budget, seed, seed, selection))
    selection = cache / "selections" / f"{selection_name('random', '5pct', 0)}.json"
    runs += [_spec(cache, "random", "5pct", 0, t, selection) for t in NOISE_SEEDS]
    return runs


def _spec(
    cache: Path, method: str, budget: str, seed: int, train_seed: int, selection: Path
) -> dict[str, Any]:
    name = f"{selection_name(method, budget, seed)}-t{train_seed}"
    return {
        "name": name,
        "method": method,
        "budget": budget,
        "selection_seed": seed,
        "train_seed": train_seed,
        "selection": str(selection),
        "epochs": EPOCHS[budget],
        "eval_epochs": EVAL_EPOCHS[budget],
        "cache": str(cache),
        "result": str(cache / "runs" / f"{name}.json"),
    }


def train_all(
    cache: Path, threads: int, limit: int | None, prefix: list[str], budgets: tuple[str, ...] = tuple(BUDGETS)
) -> None:
    specs = [s for s in plan(cache) if s["budget"] in budgets]
    done = [s for s in specs if Path(s["result"]).is_file()]
    todo = [s for s in specs if not Path(s["result"]).is_file() and Path(s["selection"]).is_file()]
    waiting = len(specs) - len(done) - len(todo)
    log(
        f"train: {len(specs)} runs planned, {len(done)} done, {len(todo)} to run now, {waiting} wait for a selection"
    )
    for number, spec in enumerate(todo[:limit] if limit else todo, start=1):
        claim = cache / "claims" / f"{spec['name']}.pid"
        if Path(spec["result"]).is_file() or not _claim(claim):
            continue  # finished or running in another `train` process (several may share the plan)
        try:
            spec_path = cache / "specs" / f"{spec['name']}.json"
            write_json(spec_path, spec)
            started = time.perf_counter()
            command = [
                *prefix,
                sys.executable,
                str(Path(__file__).with_name("downstream_train.py")),
                str(spec_path),
                "--threads",
                str(threads),
            ]
            completed = subprocess.run(command, check=False)
            status = "ok" if completed.returncode == 0 else f"FAILED (exit {completed.returncode})"
            log(
                f"train {number}/{len(todo)} {spec['name']}: {status} in {time.perf_counter() - started:.0f} s"
            )
        finally:
            claim.unlink(missing_ok=True)


def _claim(path: Path) -> bool:
    """Create ``path`` holding our pid; a claim whose process is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)
                continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


# -- stage 5: report ----------------------------------------------------------------------------------------
def load_results(cache: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((cache / "runs").glob("*.json"))]


def macro(result: dict[str, Any], eval_set: str, epoch: int) -> float | None:
    for record in result["records"]:
        if record["epoch"] == epoch and eval_set in record:
            return record[eval_set]["macro_loss"]
    return None


def report(cache: Path, output: Path, command: str) -> None:
    from scipy import stats

    results = [r for r in load_results(cache) if r["spec"]["train_seed"] not in NOISE_SEEDS]
    noise = [r for r in load_results(cache) if r["spec"]["train_seed"] in NOISE_SEEDS]
    meta = json.loads((cache / "pool_meta.json").read_text())
    pool_rows = read_jsonl(cache / "pool.jsonl")
    evals = {name: read_jsonl(cache / f"eval_{name}.jsonl") for name in ("inpool", "transfer")}
    counts = Counter(r["template"] for r in pool_rows)
    lines = [
        "# Downstream proxy: held-out loss of a small LM trained on each method's subset",
        "",
        f"Date: {date.today().isoformat()}. Machine: 2-core CPU (AMD EPYC, shared with other jobs), no GPU; "
        f"torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}.",
        "",
        "Command (resumable; by default every heavy step is a separate `flock /tmp/hf_dataselect_heavy.lock` "
        "process; `--no-lock` runs them at nice 10 instead):",
        "",
        f"    {command}",
        "",
        "## Setup",
        "",
        f"- **Pool**: T0 per-template files from `../shared/data` ({sum(counts.values())} rows, {len(counts)} "
        f"templates, imbalanced: a template keeps a log-uniform share in [{meta['setup']['pool']['min_share']}, 1] "
        f"of its rows, so template sizes range {min(counts.values())}–{max(counts.values())} rows). The template "
        "name is hidden from the selectors.",
        f"- **Evaluation**: *in-pool* = {len(evals['inpool'])} held-out rows of the pool's templates (≤ "
        f"{meta['setup']['pool']['inpool_eval_rows_per_template']} per template, never in the pool); *transfer* = "
        f"{len(evals['transfer'])} rows of {len(meta['transfer_templates'])} templates held out of the pool "
        "entirely. Metric: response loss (nats/token) per template, **macro-averaged over templates** "
        "(`hf_dataselect.evaluation.heldout_loss`).",
        f"- **Model**: Llama from scratch, {_params()} parameters ({_model_line()}); byte-level BPE tokenizer "
        f"(vocab {ModelSetup().vocab_size}) trained on the pool; chat template; loss on the response only "
        f"(`trl.SFTTrainer`, prompt-completion). Texts limited to {meta['setup']['pool']['max_tokens']} tokens "
        "(long prompts lose their start); selectors see the full rows.",
        f"- **Optimiser**: AdamW, lr {ModelSetup().learning_rate}, constant after {ModelSetup().warmup_steps} "
        f"warm-up steps, batch {ModelSetup().batch_size}, fp32, 1 CPU thread. **Fixed training length**: 6 "
        "epochs of a 5 % subset (~230 steps), 2 epochs of a 20 % subset (~305 steps); evaluated at epochs "
        f"{EVAL_EPOCHS['5pct']} (5 %) and {EVAL_EPOCHS['20pct']} (20 %) of the same run.",
        f"- **Seeds**: {len(SEEDS)} selection seeds for the seeded methods ({', '.join(STOCHASTIC)}); run *s* "
        "uses selection seed *s* and training seed *s*, so each method's run *s* is paired with random's run *s* "
        f"(paired t-test and Wilcoxon signed-rank over the seeds). {', '.join(DETERMINISTIC)} select the same rows "
        "for every seed: one run each, compared with random's seeds by a one-sample t-test.",
        "",
    ]
    lines += _noise_section(results, noise)
    for budget in BUDGETS:
        for eval_set in ("inpool", "transfer"):
            lines += _budget_table(results, budget, eval_set, stats)
        lines += _ranking_table(results, budget)
    lines += _coverage_table(cache)
    lines += _status(cache, results, noise)
    lines += kept_interpretation(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    log(f"report: {output}")


def _status(cache: Path, results: list[dict[str, Any]], noise: list[dict[str, Any]]) -> list[str]:
    specs = plan(cache)
    done = {r["spec"]["name"] for r in (*results, *noise)}
    missing = [s["name"] for s in specs if s["name"] not in done]
    lines = [f"## Status: {len(done)} of {len(specs)} planned runs finished", ""]
    if missing:
        lines += [
            "Not run yet (the benchmark resumes where it stopped: `python benchmarks/bench_downstream.py all`): "
            + ", ".join(f"`{m}`" for m in missing)
            + ".",
            "",
        ]
    return lines


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _model_line() -> str:
    m = ModelSetup()
    return f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads, MLP {m.intermediate_size}"


def _params() -> str:
    m = ModelSetup()
    embed = m.vocab_size * m.hidden_size
    layer = 4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
    return f"{(embed + m.num_layers * layer + m.hidden_size) / 1e6:.1f}M"


def _groups(results: list[dict[str, Any]], budget: str) -> dict[str, dict[int, dict[str, Any]]]:
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for result in results:
        spec = result["spec"]
        if spec["budget"] == budget:
            groups.setdefault(spec["method"], {})[spec["selection_seed"]] = result
    return groups


def _budget_table(results: list[dict[str, Any]], budget: str, eval_set: str, stats: Any) -> list[str]:
    groups = _groups(results, budget)
    if not groups:
        return []
    last = EVAL_EPOCHS[budget][-1]
    random_runs = groups.get("random", {})
    lines = [
        f"## {budget.replace('pct', ' %')} budget, {eval_set} evaluation (macro loss at the last epoch, {last})",
        "",
        "| method | runs | macro loss mean ± s.e. | Δ vs random (paired mean) | paired t p | Wilcoxon p | "
        "wins vs random | verdict (p < 0.05) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in (*STOCHASTIC, *DETERMINISTIC):
        runs = groups.get(method)
        if not runs:
            continue
        values = {s: macro(r, eval_set, last) for s, r in runs.items()}
        values = {s: v for s, v in values.items() if v is not None}
        if not values:
            continue
        arr = np.array(list(values.values()))
        mean, se = arr.mean(), (arr.std(ddof=1) / np.sqrt(len(arr)) if len(arr) > 1 else float("nan"))
        delta = t_p = w_p = "–"
        wins = verdict = "–"
        if method != "random" and random_runs:
            rand = {s: macro(r, eval_set, last) for s, r in random_runs.items()}
            rand = {s: v for s, v in rand.items() if v is not None}
            if method in STOCHASTIC:
                common = sorted(set(values) & set(rand))
                if len(common) >= 2:
                    diffs = np.array([values[s] - rand[s] for s in common])
                    delta = f"{diffs.mean():+.3f}"
                    p = stats.ttest_rel([values[s] for s in common], [rand[s] for s in common]).pvalue
                    t_p, verdict = f"{p:.3f}", _verdict(diffs.mean(), p)
                    w_p = f"{stats.wilcoxon(diffs).pvalue:.3f}" if np.any(diffs != 0) else "–"
                    wins = f"{int((diffs < 0).sum())}/{len(common)}"
            elif len(rand) >= 2:
                r = np.array(list(rand.values()))
                delta = f"{arr.mean() - r.mean():+.3f}"
                p = stats.ttest_1samp(r, arr.mean()).pvalue
                t_p, verdict = f"{p:.3f} (1-sample)", _verdict(arr.mean() - r.mean(), p)
                wins = f"{int((r > arr.mean()).sum())}/{len(r)}"
        se_text = f" ± {se:.3f}" if np.isfinite(se) else ""
        lines.append(
            f"| {method} | {len(arr)} | {mean:.3f}{se_text} | {delta} | {t_p} | {w_p} | {wins} | {verdict} |"
        )
    lines.append("")
    return lines


def _verdict(delta: float, p: float) -> str:
    if not np.isfinite(p) or p >= 0.05:
        return "not distinguishable from random"
    return "better than random" if delta < 0 else "worse than random"


def _ranking_table(results: list[dict[str, Any]], budget: str) -> list[str]:
    groups = _groups(results, budget)
    if not groups:
        return []
    lines = [
        f"### {budget.replace('pct', ' %')} budget: mean macro loss by epoch (rank in brackets)",
        "",
        "| eval set | epoch | " + " | ".join(m for m in (*STOCHASTIC, *DETERMINISTIC) if m in groups) + " |",
        "|---|---:|" + "---:|" * sum(1 for m in (*STOCHASTIC, *DETERMINISTIC) if m in groups),
    ]
    for eval_set in ("inpool", "transfer"):
        for epoch in EVAL_EPOCHS[budget]:
            means = {}
            for method in (*STOCHASTIC, *DETERMINISTIC):
                if method not in groups:
                    continue
                vals = [macro(r, eval_set, epoch) for r in groups[method].values()]
                vals = [v for v in vals if v is not None]
                means[method] = float(np.mean(vals)) if vals else float("nan")
            order = sorted((m for m in means if np.isfinite(means[m])), key=lambda m: means[m])
            rank = {m: i + 1 for i, m in enumerate(order)}
            cells = [f"{means[m]:.3f} ({rank[m]})" if m in rank else "–" for m in means]
            lines.append(f"| {eval_set} | {epoch} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _noise_section(results: list[dict[str, Any]], noise: list[dict[str, Any]]) -> list[str]:
    base = [
        r
        for r in results
        if r["spec"]["method"] == "random"
        and r["spec"]["budget"] == "5pct"
        and r["spec"]["selection_seed"] == 0
    ]
    if not noise or not base:
        return []
    lines = ["## Noise floor (5 % budget, random selection seed 0, training seeds 0 / 101 / 102)", ""]
    lines += [
        "| eval set | epoch | macro loss per training seed | spread (max − min) |",
        "|---|---:|---|---:|",
    ]
    runs = base + noise
    for eval_set in ("inpool", "transfer"):
        for epoch in EVAL_EPOCHS["5pct"]:
            vals = [macro(r, eval_set, epoch) for r in runs]
            vals = [v for v in vals if v is not None]
            if vals:
                lines.append(
                    f"| {eval_set} | {epoch} | {', '.join(f'{v:.3f}' for v in vals)} | "
                    f"{max(vals) - min(vals):.3f} |"
                )
    return [*lines, ""]


def _coverage_table(cache: Path) -> list[str]:
    rows = {}
    for path in sorted((cache / "selections").glob("*.json")):
        data = json.loads(path.read_text())
        rows.setdefault((data["budget"], data["method"]), []).append(data)
    if not rows:
        return []
    pool_templates = len({r["template"] for r in read_jsonl(cache / "pool.jsonl")})
    lines = [
        f"## Selections: templates covered (of {pool_templates}) and overlap between seeds",
        "",
        "| budget | method | selections | templates covered (mean) | mean Jaccard overlap between seeds | "
        "selection time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (budget, method), sels in sorted(rows.items()):
        sets = [set(s["positions"]) for s in sels]
        overlaps = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        overlap = f"{np.mean(overlaps):.2f}" if overlaps else "–"
        covered = np.mean([s["templates_covered"] for s in sels])
        seconds = np.mean([s["seconds"] for s in sels])
        lines.append(f"| {budget} | {method} | {len(sels)} | {covered:.1f} | {overlap} | {seconds:.1f} |")
    return [*lines, ""]


# -- driver -------------------------------------------------------------------------------------------------
def run_prefix(args: argparse.Namespace) -> list[str]:
    """Heavy steps wait for the machine's heavy-job lock (default) or run at low CPU priority."""
    return ["nice", "-n", "10"] if args.no_lock else ["flock", LOCK]


def locked(stage: str, args: argparse.Namespace, methods: list[str] | None = None) -> None:
    """Run a stage of this script as a separate process holding the heavy-job lock."""
    command = [
        *run_prefix(args),
        sys.executable,
        __file__,
        stage,
        "--cache",
        str(args.cache),
        "--data",
        str(args.data),
    ]
    command += ["--methods", *(methods or args.methods), "--threads", str(args.threads)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    log(f"{stage}: done in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["all", "prepare", "features", "select", "train", "report"])
    parser.add_argument(
        "--data", type=Path, default=T0_DIR, help="T0 per-template folder (default: %(default)s)"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: %(default)s)"
    )
    parser.add_argument("--methods", nargs="+", default=[*STOCHASTIC, *DETERMINISTIC])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--limit", type=int, default=None, help="train at most this many runs now")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="train stage: budgets to train")
    parser.add_argument(
        "--report-command",
        default="python benchmarks/bench_downstream.py all",
        help="the command line the report names as the one that produced it",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_MD)
    parser.add_argument(
        "--no-lock",
        action="store_true",
        help="run the heavy steps at low priority (nice 10) instead of waiting for the heavy-job lock",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage in ("all", "prepare", "features", "select") and not args.data.is_dir():
        print(
            f"error: the T0 data folder {args.data} does not exist (it ships in ../shared/data); pass --data.",
            file=sys.stderr,
        )
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    if args.stage == "prepare":
        build_pool(args.data, args.cache)
    elif args.stage == "features":
        features(args.cache, with_sae=any(m.startswith("sae-") for m in args.methods))
    elif args.stage == "select":
        selections(args.cache, args.methods)
    elif args.stage == "train":
        train_all(args.cache, args.threads, args.limit, run_prefix(args), tuple(args.budgets))
    elif args.stage == "report":
        report(args.cache, args.output, args.report_command)
    else:
        # methods without SAE features first, so that training starts while nothing else is needed; then the
        # SAE features, the SAE selections and their runs (the plan skips runs whose selection is missing)
        plain = [m for m in args.methods if not m.startswith("sae-")]
        locked("prepare", args)
        locked("features", args, plain)
        locked("select", args, plain)
        first = next(iter(BUDGETS))
        train_all(args.cache, args.threads, args.limit, run_prefix(args), (first,))
        if len(plain) < len(args.methods):
            locked("features", args)
            locked("select", args)
            train_all(args.cache, args.threads, args.limit, run_prefix(args), (first,))
        train_all(args.cache, args.threads, args.limit, run_prefix(args))
        report(args.cache, args.output, "python benchmarks/bench_downstream.py all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
