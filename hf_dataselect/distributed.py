"""Running transforms on several processes: ``torch.distributed`` ranks and ``datasets`` ``num_proc`` workers.

:func:`map_across_processes` is ``dataset.map`` for a script started with ``accelerate launch`` or
``torchrun``: every process maps a contiguous shard of the rows, the new columns are gathered, and every
process returns the full mapped dataset, equal to a single-process ``dataset.map``::

    from accelerate import PartialState
    from hf_dataselect import Embeddings
    from hf_dataselect.distributed import map_across_processes

    state = PartialState()                    # or Accelerator(); reads the launcher's environment
    ds = map_across_processes(ds, Embeddings())  # same rows and columns on every process
    state.destroy_process_group()             # before the script exits

:func:`configure_torch_threads` keeps ``num_proc`` workers from oversubscribing the CPU: each fork of the
``datasets`` pool would otherwise start one torch thread per core.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


# -- threads ---------------------------------------------------------------------------------------------
def in_pool_worker() -> bool:
    """Whether this process is a worker of a ``multiprocess``/``multiprocessing`` pool (``datasets`` num_proc)."""
    return any(
        "PoolWorker" in sys.modules[name].current_process().name
        for name in ("multiprocess", "multiprocessing")
        if name in sys.modules
    )


def configure_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``num_threads`` if given, else one thread inside a pool worker.

    ``datasets.map(num_proc=N)`` forks ``N`` workers that would each start one torch thread per core (N×
    oversubscription). A worker cannot tell ``N`` reliably (the pool's siblings include ``datasets``' manager
    process), so it takes one thread, as PyTorch's DataLoader workers and ``torchrun`` (``OMP_NUM_THREADS=1``)
    do; choose ``num_proc`` ≈ cores, or pass ``num_threads`` (e.g. cores // num_proc). In the main process
    with ``num_threads=None`` nothing changes. Returns the thread count in effect.
    """
    import torch

    if num_threads is None and in_pool_worker():
        num_threads = 1
    if num_threads is not None and num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def configure_faiss_threads(num_threads: int | None = None) -> None:
    """Set faiss' OpenMP threads: ``num_threads`` if given, else one thread inside a pool worker.

    Beyond oversubscription, this avoids a hang: a worker forked from a process whose OpenMP runtime already
    ran a parallel region (any faiss search) deadlocks on its next parallel region; one thread never starts
    one.
    """
    if num_threads is None and not in_pool_worker():
        return
    import faiss

    faiss.omp_set_num_threads(num_threads or 1)


# -- torch.distributed -----------------------------------------------------------------------------------
def process_rank_and_count() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from an initialised ``torch.distributed`` group, else the
    launcher's environment through ``accelerate.PartialState`` (which initialises the group), else ``(0, 1)``.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes
    return 0, 1


def map_across_processes(
    dataset: Dataset,
    function: Callable[..., Any],
    *,
    batched: bool = True,
    batch_size: int = 1000,
    desc: str | None = None,
    **map_kwargs: Any,
) -> Dataset:
    """``dataset.map(function, ...)`` with the rows shared among the processes of a distributed run.

    Each of the ``world_size`` processes maps one contiguous shard (cached by ``datasets`` like any map); the
    columns that the map added or changed are then gathered, in rank order, to every process, which returns
    the full mapped dataset: same rows in the same order as a single-process ``dataset.map`` would give.
    Columns the map removed are removed. Outside a distributed run this is ``dataset.map``.

    Shards start at multiples of ``batch_size`` (:func:`shard_bounds`), so every batch the function sees holds
    the same rows as in the single-process map. A batched model transform pads and groups the rows of each
    batch, and in bfloat16 a row's result depends on its batch (kernels are chosen by shape) by up to ~1e-3,
    enough to change a k-means selection; with the same batches the values are identical, bit for bit, as
    long as the kernels do not also depend on the thread count. On CPU, oneDNN's bfloat16 kernels for small
    batches do (``torchrun`` gives each process one thread), so there the results of a single process with
    more threads agree only to that rounding. ``datasets``' own ``num_proc`` splits rows evenly, not on batch
    boundaries, so its results also agree only to the rounding.

    Every process must call it (it synchronises them). With NCCL, set the CUDA device of each process first
    (``Accelerator``/``PartialState`` do).
    """
    if "num_proc" in map_kwargs and map_kwargs["num_proc"] not in (None, 1):
        raise InputError("map_across_processes already splits rows across processes; drop num_proc.")
    rank, world = process_rank_and_count()
    kwargs = dict(batched=batched, batch_size=batch_size, desc=desc, **map_kwargs)
    if world == 1:
        return dataset.map(function, **kwargs)

    start, stop = shard_bounds(len(dataset), world, batch_size if batched else 1)[rank]
    shard = dataset.select(range(start, stop) if stop > start else [])  # datasets refuses range(n, n)
    mapped = shard.map(function, **kwargs)
    added, removed = _changed_columns(shard, mapped)
    parts, added, removed = _all_gather_shards(mapped, added, removed, world)
    base = dataset.remove_columns(sorted(set(removed) | set(added) & set(dataset.column_names)))
    return _attach_columns(base, parts, dataset, function, kwargs)


def shard_bounds(rows: int, world: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's contiguous shard, cut between map batches of ``batch_size`` rows.

    The ``ceil(rows / batch_size)`` batches are dealt out as evenly as possible, the first ranks taking one
    more; ranks beyond the number of batches get empty shards. ``batch_size`` ``None`` or ``<= 0`` (one batch
    of all rows, as ``datasets`` reads it) cannot be split on a batch boundary: rows are then split evenly.
    """
    if batch_size is None or batch_size <= 0:
        batch_size, batches = 1, rows
    else:
        batches = -(-rows // batch_size)
    per_rank, extra = divmod(batches, world)
    bounds = []
    first = 0
    for rank in range(world):
        last = first + per_rank + (1 if rank < extra else 0)
        bounds.append((min(rows, first * batch_size), min(rows, last * batch_size)))
        first = last
    return bounds


def _changed_columns(shard: Dataset, mapped: Dataset) -> tuple[list[str], list[str]]:
    """Columns of ``mapped`` that are new or differ from ``shard``, and columns it dropped."""
    if len(mapped) != len(shard):
        raise InputError(
            "map_across_processes needs a map that keeps one output row per input row "
            f"(this shard went from {len(shard)} to {len(mapped)} rows)."
        )
    removed = [c for c in shard.column_names if c not in mapped.column_names]
    changed = []
    shard_table = shard.with_format("arrow")
    mapped_table = mapped.with_format("arrow")
    for column in mapped.column_names:
        if column not in shard.column_names or not mapped_table[column].equals(shard_table[column]):
            changed.append(column)
    return changed, removed


def _all_gather_shards(
    mapped: Dataset, added: list[str], removed: list[str], world: int
) -> tuple[list[Any], list[str], list[str]]:
    """``(tables, added, removed)``: the changed columns of every rank's shard as Arrow tables in rank order
    (Arrow IPC bytes through the process group), and the column changes all ranks agree on.

    A column counts as changed when the map changed it on any rank's rows. A rank past the last batch mapped
    no rows and cannot tell, so it only follows the others.
    """
    import pyarrow as pa
    import torch.distributed as dist

    views: list[Any] = [None] * world
    dist.all_gather_object(views, (len(mapped), added, removed))
    with_rows = [view for view in views if view[0]] or views
    changed = {column for _, columns, _ in with_rows for column in columns}
    added = [column for column in mapped.column_names if column in changed]
    removed = with_rows[0][2]
    payload = b""
    if added and len(mapped):
        table = mapped.select_columns(added).with_format("arrow")[:]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        payload = sink.getvalue().to_pybytes()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, payload)
    return [pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in gathered if b], added, removed


def _attach_columns(
    base: Dataset, parts: list[Any], original: Dataset, function: Callable[..., Any], kwargs: dict[str, Any]
) -> Dataset:
    import pyarrow as pa
    from datasets import Dataset, concatenate_datasets
    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash(
        [original._fingerprint, function, {k: v for k, v in kwargs.items() if k != "desc"}]
    )
    if not parts:
        result = base.flatten_indices() if base._indices is not None else base
    else:
        columns = Dataset(pa.concat_tables(parts), fingerprint=f"{fingerprint}-columns")
        flat = base.flatten_indices() if base._indices is not None else base
        result = concatenate_datasets([flat, columns], axis=1) if flat.column_names else columns
    result._fingerprint = fingerprint
    return result
