"""Embeddings across two torchrun processes: each embeds its shard, both end with the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "embed_distributed.py"


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    from hf_dataselect.demo import demo_pool
    from hf_dataselect.transforms.embed import Embeddings

    # built-in demo rows: with these, an even 15/15 split changed 5 rows' bf16 embeddings (AMX CPU, 2 threads)
    columns = ["instruction", "input", "output"]
    dataset = demo_pool().select(range(30)).select_columns(columns)
    dataset = dataset.add_column("id", list(range(30)))
    dataset.save_to_disk(str(tmp_path / "pool"))
    (tmp_path / "out").mkdir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    # two threads per process and in the reference below: oneDNN's bf16 kernels for small batches depend on the
    # thread count, and with more than one thread also on the batch's shape, which aligned shards keep
    env["OMP_NUM_THREADS"] = "2"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT), "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        single = np.asarray(dataset.map(Embeddings(device="cpu"), batched=True, batch_size=8)["embedding"])
        small = np.asarray(
            dataset.select(range(5)).map(Embeddings(device="cpu"), batched=True, batch_size=8)["embedding"]
        )
    finally:
        torch.set_num_threads(threads)
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [r["world_size"] for r in reports] == [2, 2]
    # each process embedded only its shard, cut between map batches of 8: rows 0-15 and 16-29
    assert [r["rows_embedded"] for r in reports] == [16, 14]
    assert [r["rows_embedded_small"] for r in reports] == [5, 0]
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    for rank, report in enumerate(reports):
        assert report["columns"] == [*columns, "id", "embedding"]
        assert report["small_columns"] == [*columns, "id", "embedding"]
        assert report["ids"] == list(range(30))  # rows in the original order
        # the same batches as one process, so the same values, bit for bit (also in bfloat16)
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"rank{rank}.npy"), single)
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"rank{rank}_small.npy"), small)


@pytest.mark.parametrize(
    ("rows", "world", "batch_size", "expected"),
    [
        (30, 2, 8, [(0, 16), (16, 30)]),
        (32, 2, 8, [(0, 16), (16, 32)]),
        (40, 3, 8, [(0, 16), (16, 32), (32, 40)]),
        (5, 2, 8, [(0, 5), (5, 5)]),
        (0, 2, 8, [(0, 0), (0, 0)]),
        (5, 2, None, [(0, 3), (3, 5)]),  # one batch of everything: split evenly
        (5, 2, 0, [(0, 3), (3, 5)]),
    ],
)
def test_shards_start_at_map_batch_boundaries(rows, world, batch_size, expected):
    from hf_dataselect.distributed import shard_bounds

    assert shard_bounds(rows, world, batch_size) == expected


def test_single_process_is_a_plain_map():
    from datasets import Dataset

    from hf_dataselect.distributed import map_across_processes, process_rank_and_count
    from hf_dataselect.errors import InputError

    assert process_rank_and_count() == (0, 1)
    dataset = Dataset.from_dict({"x": [1, 2, 3]})

    def double(batch):
        return {"y": [2 * v for v in batch["x"]]}

    mapped = map_across_processes(dataset, double)
    assert (
        mapped["y"][:] == [2, 4, 6] and mapped._fingerprint == dataset.map(double, batched=True)._fingerprint
    )
    with pytest.raises(InputError, match="drop num_proc"):
        map_across_processes(dataset, double, num_proc=2)
