"""Embeddings across two torchrun processes: each embeds its shard, both end with the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "embed_distributed.py"


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    from datasets import Dataset

    from hf_dataselect.transforms.embed import Embeddings

    prompts = [f"Question {i}: what is {i} times {i + 3}?" + " Explain." * (i % 5) for i in range(30)]
    answers = [f"It is {i * (i + 3)}." for i in range(30)]
    dataset = Dataset.from_dict({"id": list(range(30)), "prompt": prompts, "completion": answers})
    dataset.save_to_disk(str(tmp_path / "pool"))
    (tmp_path / "out").mkdir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets one thread per process
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT), "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    single = np.asarray(dataset.map(Embeddings(device="cpu"), batched=True, batch_size=8)["embedding"])
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    results = [np.load(tmp_path / "out" / f"rank{r}.npy") for r in (0, 1)]

    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["rows_embedded"] for r in reports] == [15, 15]  # each process embedded only its shard
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    for report, result in zip(reports, results, strict=True):
        assert report["columns"] == ["id", "prompt", "completion", "embedding"]
        assert report["ids"] == list(range(30))  # rows in the original order
        np.testing.assert_allclose(result, single, atol=2e-3)
        assert (result * single).sum(1).min() > 0.9999
    np.testing.assert_array_equal(results[0], results[1])


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
