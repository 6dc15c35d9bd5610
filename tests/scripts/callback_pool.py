"""Small planted pools and trainer set-ups shared by the callback tests and the two-process script."""

from __future__ import annotations

import random
from typing import Any

TOPICS = {
    0: ["ocean", "wave", "ship", "harbor", "tide", "sail"],
    1: ["garden", "flower", "seed", "soil", "rain", "leaf"],
    2: ["engine", "wheel", "road", "fuel", "gear", "brake"],
    3: ["violin", "piano", "song", "melody", "drum", "choir"],
}
VOCABULARY = {word for words in TOPICS.values() for word in words} | {"the", "a", "is", "and", "of", "answer"}


def planted_rows(
    per_cluster: int = 24, *, noise_cluster: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Chat rows in four topic clusters; every prompt is unique. The noise cluster's gold answers are gibberish."""
    rng = random.Random(seed)
    rows = []
    for i in range(per_cluster * len(TOPICS)):
        cluster = i % len(TOPICS)
        words = TOPICS[cluster]
        prompt = f"Question {i}: tell me about the {rng.choice(words)} and the {rng.choice(words)}."
        if cluster == noise_cluster:
            answer = " ".join("".join(rng.choice("qxzjvk") for _ in range(5)) for _ in range(6))
        else:
            answer = "The answer is " + " and ".join(rng.choice(words) for _ in range(4)) + "."
        rows.append(
            {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "cluster": cluster,
                "row_id": i,
            }
        )
    return rows


def planted_pool(per_cluster: int = 24, *, noise_cluster: int | None = None, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_list(planted_rows(per_cluster, noise_cluster=noise_cluster, seed=seed))


def reward_like(prompts: list[str], responses: list[str]) -> list[float]:
    """A deterministic stand-in for a reward model: the share of real words in the gold answer."""
    scores = []
    for response in responses:
        words = [w.strip(".,:").lower() for w in response.split()]
        scores.append(sum(w in VOCABULARY for w in words) / max(len(words), 1))
    return scores


def sft_config(output_dir: str, **overrides: Any):
    from trl import SFTConfig

    options: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1000,
        "max_length": 64,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "activation_checkpointing": False,
    }
    options.update(overrides)
    return SFTConfig(**options)


class RowRecorder:
    """Records which training rows the model's forward pass receives, epoch by epoch (training mode only)."""

    def __init__(self, model, train_dataset) -> None:
        self.lookup = {tuple(ids): i for i, ids in enumerate(train_dataset["input_ids"])}
        self.epochs: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def new_epoch(self) -> None:
        self.epochs.append([])

    def _hook(self, module, args, kwargs) -> None:
        if not module.training:
            return
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        for row in range(ids.shape[0]):
            tokens = ids[row] if mask is None else ids[row][mask[row].bool()]
            self.epochs[-1].append(self.lookup[tuple(tokens.tolist())])


def epoch_marker(recorder: RowRecorder):
    """A callback that opens a new epoch in ``recorder`` (added after DataSelectionCallback)."""
    from transformers import TrainerCallback

    class EpochMarker(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            recorder.new_epoch()

    return EpochMarker()
