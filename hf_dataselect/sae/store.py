"""Training batches of activations, never the whole activation set in memory.

Two sources, both deterministic for a seed and both resumable at any step:

* :class:`DiskActivations` — one pass of the model over the rows writes the activations to a flat file on disk
  (read back through ``numpy.memmap``); every epoch then visits the tokens in a fresh random order. The model
  runs once however many epochs are trained. The default.
* :class:`StreamedActivations` — no disk: the model runs over the rows (in a random order per epoch) while the
  SAE trains; activations go through a shuffle buffer of ``buffer_tokens`` tokens so that a batch mixes many
  texts. For activation sets too large for the disk; every epoch runs the model again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    import torch

    from hf_dataselect.sae.activations import HiddenStateReader

logger = logging.getLogger(__name__)

_ROWS_PER_READ = 512
"""Rows tokenised (and sorted by length) at once before they are cut into model batches."""

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def read_rows(reader: HiddenStateReader, texts: Sequence[str], *, progress: Any = None) -> Iterator[Any]:
    """Model batches over ``texts`` in ``_ROWS_PER_READ``-row chunks (so tokenisation stays bounded)."""
    for start in range(0, len(texts), _ROWS_PER_READ):
        chunk = texts[start : start + _ROWS_PER_READ]
        for batch in reader.batches(chunk):
            batch.rows = batch.rows + start
            yield batch
        if progress is not None:
            progress.update(len(chunk))


class DiskActivations:
    """Token activations of a list of texts in a flat ``[tokens, d]`` file, plus ``info.json``."""

    DATA = "activations.bin"
    INFO = "info.json"

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.folder = folder
        self.info = info
        self.num_tokens = int(info["num_tokens"])
        self.d_in = int(info["d_in"])
        dtype = _NUMPY_DTYPES[info["dtype"]]
        self.data = (
            np.memmap(folder / self.DATA, dtype=dtype, mode="r", shape=(self.num_tokens, self.d_in))
            if self.num_tokens
            else np.zeros((0, self.d_in), dtype=dtype)
        )

    @classmethod
    def open(cls, folder: str | os.PathLike, key: str) -> DiskActivations | None:
        """The cache in ``folder`` if it is complete and was built for ``key`` (else ``None``)."""
        folder = Path(folder)
        info_file = folder / cls.INFO
        if not info_file.is_file():
            return None
        info = json.loads(info_file.read_text())
        if info.get("key") != key:
            return None
        return cls(folder, info)

    @classmethod
    def build(
        cls,
        reader: HiddenStateReader,
        texts: Sequence[str],
        folder: str | os.PathLike,
        *,
        key: str,
        dtype: str = "float32",
        progress: bool = True,
    ) -> DiskActivations:
        """Run the model over ``texts`` once and write their activations to ``folder`` (atomically)."""
        from tqdm.auto import tqdm

        if dtype not in _NUMPY_DTYPES:
            raise InputError(f"Activation cache dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype!r}.")
        folder = Path(folder)
        num_tokens = 0
        bar = tqdm(total=len(texts), desc="Caching activations", unit="row", disable=not progress)
        with atomic.staging_folder(folder, name=folder.name + ".partial") as partial:
            with open(partial / cls.DATA, "wb") as out:
                for batch in read_rows(reader, texts, progress=bar):
                    array = batch.activations.float().cpu().numpy().astype(_NUMPY_DTYPES[dtype], copy=False)
                    out.write(array.tobytes())
                    num_tokens += array.shape[0]
            bar.close()
            info = {
                "key": key,
                "num_tokens": num_tokens,
                "d_in": reader.width,
                "dtype": dtype,
                "rows": len(texts),
            }
            (partial / cls.INFO).write_text(json.dumps(info))
        logger.info("Cached %d token activations (%d rows) in %s.", num_tokens, len(texts), folder)
        return cls(folder, info)

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.data[np.sort(token_ids)], dtype=np.float32)


@dataclass
class StreamState:
    """Where a stream is: enough to rebuild the same batches after a restart."""

    epoch: int = 0
    cursor: int = 0
    """Position (in the epoch's row order) of the first row of the current buffer fill."""
    fill: int = 0
    """Buffer fills so far in this epoch (seeds the shuffle of each fill)."""
    consumed: int = 0
    """Batches already taken from the current fill."""
    carry: Any = None
    """Tokens left over from the previous fill (fewer than one batch), as a ``[c, d]`` tensor."""
    extra: dict[str, Any] = field(default_factory=dict)


class DiskBatches:
    """Batches of ``batch_tokens`` random tokens from a :class:`DiskActivations`; epoch e uses permutation e."""

    def __init__(self, cache: DiskActivations, batch_tokens: int, seed: int) -> None:
        if cache.num_tokens < batch_tokens:
            raise InputError(
                f"The training rows hold {cache.num_tokens} tokens (special tokens excluded), fewer than one "
                f"batch of batch_tokens={batch_tokens}; use more rows or a smaller batch_tokens."
            )
        self.cache = cache
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.steps_per_epoch = cache.num_tokens // batch_tokens
        self._permutation: tuple[int, np.ndarray] | None = None

    @property
    def d_in(self) -> int:
        return self.cache.d_in

    def steps_for(self, epochs: float) -> int:
        return max(1, math.floor(epochs * self.steps_per_epoch))

    def batch(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.cache.num_tokens)
            self._permutation = (epoch, order)
        order = self._permutation[1]
        return self.cache.rows(order[position * self.batch_tokens : (position + 1) * self.batch_tokens])

    def iterate(self, start_step: int, num_steps: int | None) -> Iterator[np.ndarray]:
        step = start_step
        while num_steps is None or step < num_steps:
            yield self.batch(step)
            step += 1

    def state(self) -> StreamState | None:
        return None


class StreamedActivations:
    """Batches straight from the model through a shuffle buffer (see the module docstring)."""

    def __init__(
        self,
        reader: HiddenStateReader,
        texts: Sequence[str],
        batch_tokens: int,
        *,
        buffer_tokens: int,
        seed: int,
        epochs: float | None,
        state: StreamState | None = None,
    ) -> None:
        if buffer_tokens < batch_tokens:
            raise InputError(f"buffer_tokens ({buffer_tokens}) must be ≥ batch_tokens ({batch_tokens}).")
        self.reader = reader
        self.texts = texts
        self.batch_tokens = batch_tokens
        self.buffer_tokens = buffer_tokens
        self.seed = seed
        self.epochs = epochs
        self._state = state or StreamState()
        self.d_in = reader.width

    def state(self) -> StreamState:
        return self._state

    def _row_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.texts))

    def iterate(self, start_step: int, num_steps: int | None) -> Iterator[torch.Tensor]:
        import torch

        step = start_step
        state = self._state
        while num_steps is None or step < num_steps:
            if self.epochs is not None and state.epoch >= math.ceil(self.epochs):
                return
            order = self._row_order(state.epoch)
            parts = [state.carry] if state.carry is not None else []
            have = sum(int(p.shape[0]) for p in parts)
            cursor = state.cursor
            while have < self.buffer_tokens and cursor < len(order):
                chunk = [self.texts[i] for i in order[cursor : cursor + _ROWS_PER_READ]]
                cursor += len(chunk)
                for batch in self.reader.batches(chunk):
                    parts.append(batch.activations.float().cpu())
                    have += int(batch.activations.shape[0])
            buffer = torch.cat(parts) if parts else torch.zeros(0, self.d_in)
            fill_seed = np.random.default_rng([self.seed, state.epoch, state.fill, 2]).integers(1 << 62)
            generator = torch.Generator().manual_seed(int(fill_seed))
            buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
            full = buffer.shape[0] // self.batch_tokens
            epoch_done = cursor >= len(order)
            if full == 0 and epoch_done and self.epochs is not None and state.epoch + 1 >= self.epochs:
                return
            for index in range(state.consumed, full):
                if num_steps is not None and step >= num_steps:
                    return
                state.consumed = index + 1
                yield buffer[index * self.batch_tokens : (index + 1) * self.batch_tokens]
                step += 1
            leftover = buffer[full * self.batch_tokens :].clone()
            if epoch_done:
                state.epoch, state.cursor, state.fill = state.epoch + 1, 0, 0
            else:
                state.cursor, state.fill = cursor, state.fill + 1
            state.consumed = 0
            state.carry = leftover if leftover.shape[0] else None
