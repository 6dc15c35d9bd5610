"""``SelectionSampler``: a fixed-length training sampler whose rows can change between epochs.

The stock ``Trainer`` (and TRL's ``SFTTrainer``) fixes the number of steps from the dataloader's length before
training starts, builds the dataloader once, and iterates its sampler anew every epoch. Reassigning
``trainer.train_dataset`` or the dataloader mid-training has no effect, and persistent dataloader workers keep
a copy of the dataset. A sampler, however, runs in the main process and is iterated each epoch, so replacing
its index list between epochs changes exactly which rows the next epoch trains on, with any number of
workers. Its length never changes (a different length would be silently truncated by the Trainer).

Under several processes, accelerate wraps the sampler's batches in ``BatchSamplerShard``: every process
iterates the same order (the permutation depends only on the seed, the epoch and the rows) and takes every
``num_processes``-th batch, so the ranks train on disjoint shards of one selection.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from hf_dataselect.errors import InputError

_SHUFFLE_STREAM = 7  # keeps the shuffle independent of the selection's random streams


class SelectionSampler(Sampler[int]):
    """Yields the current epoch's rows (positions in the trainer's ``train_dataset``) in a seeded order.

    Args:
        num_rows: rows per epoch; the sampler's length, fixed for the whole run.
        seed: seeds the per-epoch shuffle.
        shuffle: shuffle the rows each epoch (``False``: ascending positions).
    """

    def __init__(self, num_rows: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if num_rows < 1:
            raise InputError(f"A selection sampler needs at least one row per epoch, got {num_rows}.")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.positions: np.ndarray | None = None

    def set_rows(self, epoch: int, positions: np.ndarray) -> None:
        """Rows of ``epoch`` (called by the callback at the start of every epoch)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 1 or len(positions) != self.num_rows:
            raise ValueError(f"Expected {self.num_rows} rows for epoch {epoch}, got {len(positions)}.")
        self.epoch = int(epoch)
        self.positions = positions

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer/accelerate each epoch; the callback already set the same epoch."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This epoch's rows in the order they are yielded."""
        if self.positions is None:
            raise RuntimeError(
                "The selection sampler has no rows: DataSelectionCallback sets them at the start of each epoch. "
                "Was the callback passed to the trainer (callbacks=[...]) as well as attached?"
            )
        if not self.shuffle:
            return np.sort(self.positions)
        rng = np.random.default_rng([self.seed, self.epoch, _SHUFFLE_STREAM])
        return np.sort(self.positions)[rng.permutation(self.num_rows)]

    def __iter__(self) -> Iterator[int]:
        yield from self.order().tolist()

    def __len__(self) -> int:
        return self.num_rows
