"""Short SAE training runs that chose the recipe of the FVU benchmark (results/sae.md (a2), (a3)).

``lr``: learning rate × batch size on an existing activation cache (the one bench_sae_training.py wrote), the
training FVU at the end of a fixed token budget. ``layers``: the same SAE recipe on several MiniLM blocks, one
seeded set of texts (200 LIMA + 3,000 T0 rows), activations held in memory. ``schedule``: peak learning
rate, batch size and the length of the final linear decay on one block, the same texts.

    python benchmarks/bench_sae_recipe.py lr --cache /tmp/hf_dataselect_bench_sae/checkpoint/activations \\
        --configs 3.27e-4:4096 1.3e-3:4096 4e-3:4096 1.3e-3:1024
    python benchmarks/bench_sae_recipe.py layers --layers 1 3 5
    python benchmarks/bench_sae_recipe.py schedule --layer 5 --tokens 2000000 \\
        --configs 1.3e-3:1024:0.2 1.3e-3:1024:0.5 2.6e-3:1024:0.9

Every run: width 6144 (16 × 384), k = 32, AuxK 1/32, warm-up over the first tenth, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sae_common import LIMA, T0_DIR, lima_rows, t0_rows, texts_of  # noqa: E402


def train_fvu(batches, lr: float, batch_tokens: int, tokens: int, decay_fraction: float = 0.2) -> list[float]:
    """Train a fresh SAE on ``batches(step)`` for ``tokens`` tokens; FVU of every step."""
    from hf_dataselect.sae.model import TopKSAE
    from hf_dataselect.sae.train import SAETrainer, SAETrainingConfig

    steps = tokens // batch_tokens
    config = SAETrainingConfig(
        batch_tokens=batch_tokens,
        lr=lr,
        lr_warmup_steps=max(1, steps // 10),
        lr_decay_fraction=decay_fraction,
    )
    trainer = SAETrainer(TopKSAE(384, 6144, 32, seed=0), config, total_steps=steps)
    return [trainer.step(batches(step))["fvu"] for step in range(steps)]


def learning_rates(args: argparse.Namespace) -> dict:
    from hf_dataselect.sae.store import DiskActivations, DiskBatches

    cache = DiskActivations(args.cache, json.loads((args.cache / DiskActivations.INFO).read_text()))
    results = {}
    for spec in args.configs:
        lr, batch_tokens = float(spec.split(":")[0]), int(spec.split(":")[1])
        source = DiskBatches(cache, batch_tokens, seed=0)
        fvu = train_fvu(lambda step, s=source: torch.from_numpy(s.batch(step)), lr, batch_tokens, args.tokens)
        results[spec] = float(np.mean(fvu[-max(1, len(fvu) // 20) :]))
        print(
            f"lr {lr:g}, batch {batch_tokens}: FVU {results[spec]:.4f} after {args.tokens:,} tokens",
            flush=True,
        )
    return results


def layer_activations(layers: list[int], texts: list[str]) -> dict[int, torch.Tensor]:
    """Hidden states of every non-special token at the output of each block in ``layers`` (fp32 MiniLM)."""
    from hf_dataselect import models

    tokenizer = models.load_tokenizer(None)
    model = models.load_model(None, kind="base", dtype="float32")
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    order = np.argsort([len(text) for text in texts])
    with torch.inference_mode():
        for start in range(0, len(texts), 32):
            batch = [texts[i] for i in order[start : start + 32]]
            encoded = tokenizer(
                batch,
                truncation=True,
                max_length=512,
                padding=True,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            keep = encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()
            hidden = model(
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                output_hidden_states=True,
            ).hidden_states
            for layer in layers:
                collected[layer].append(hidden[layer + 1][keep].clone())  # hidden[0] is the embeddings
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


class ShuffledBatches:
    """Consecutive slices of a seeded permutation of the rows, a new permutation when one runs out."""

    def __init__(self, rows: torch.Tensor, batch_tokens: int, seed: int) -> None:
        self.rows, self.batch_tokens = rows, batch_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(rows), generator=self.generator)
        self.position = 0

    def __call__(self, step: int) -> torch.Tensor:
        if self.position + self.batch_tokens > len(self.rows):
            self.order = torch.randperm(len(self.rows), generator=self.generator)
            self.position = 0
        chosen = self.order[self.position : self.position + self.batch_tokens]
        self.position += self.batch_tokens
        return self.rows[chosen]


def recipe_texts() -> list[str]:
    return texts_of(lima_rows(LIMA)[:200]) + texts_of(t0_rows(T0_DIR, 3000, 7))


def schedules(args: argparse.Namespace) -> dict:
    """Peak learning rate, batch size and length of the final linear decay, on one block's activations."""
    activations = layer_activations([args.layer], recipe_texts())[args.layer]
    results = {}
    for spec in args.configs:
        lr, batch_tokens, decay = spec.split(":")
        batch = ShuffledBatches(activations, int(batch_tokens), seed=0)
        fvu = train_fvu(batch, float(lr), int(batch_tokens), args.tokens, float(decay))
        results[spec] = float(np.mean(fvu[-max(1, len(fvu) // 20) :]))
        print(
            f"lr {lr}, batch {batch_tokens}, decay over the last {decay}: FVU {results[spec]:.4f}", flush=True
        )
    return results


def layers(args: argparse.Namespace) -> dict:
    texts = recipe_texts()
    results = {}
    for layer, activations in layer_activations(args.layers, texts).items():
        batch = ShuffledBatches(activations, args.batch_tokens, seed=0)
        fvu = train_fvu(batch, args.lr, args.batch_tokens, args.tokens)
        results[f"encoder.layer.{layer}"] = {
            "fvu_last_50_steps": float(np.mean(fvu[-50:])),
            "tokens": len(activations),
            "mean_variance_per_dim": float(activations.var(0).mean()),
        }
        print(f"encoder.layer.{layer}: {json.dumps(results[f'encoder.layer.{layer}'])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    lr = sub.add_parser("lr", help="learning rate x batch size on a cached activation set")
    lr.add_argument("--cache", type=Path, default=Path("/tmp/hf_dataselect_bench_sae/checkpoint/activations"))
    lr.add_argument(
        "--configs", nargs="+", default=["3.27e-4:4096", "1.3e-3:4096", "4e-3:4096", "1.3e-3:1024"]
    )
    lr.add_argument("--tokens", type=int, default=1_000_000)
    per_layer = sub.add_parser("layers", help="the same recipe on several MiniLM blocks")
    per_layer.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    per_layer.add_argument("--lr", type=float, default=1.3e-3)
    per_layer.add_argument("--batch-tokens", type=int, default=1024)
    per_layer.add_argument("--tokens", type=int, default=1_000_000)
    schedule = sub.add_parser("schedule", help="lr, batch and decay length on one block's activations")
    schedule.add_argument("--layer", type=int, default=5)
    schedule.add_argument(
        "--configs", nargs="+", default=["1.3e-3:1024:0.2", "1.3e-3:1024:0.5", "2.6e-3:1024:0.9"]
    )
    schedule.add_argument("--tokens", type=int, default=2_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = {"lr": learning_rates, "layers": layers, "schedule": schedules}[args.what]
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
