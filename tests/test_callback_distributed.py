"""Two CPU processes under torchrun: one selection on every rank, disjoint shards of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")


@pytest.mark.distributed
def test_two_processes_share_one_selection_and_split_it(tiny_llama_path, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    script = Path(__file__).parent / "scripts" / "callback_two_ranks.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tiny_llama_path), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["selections"] == ranks[1]["selections"]  # the same selection on both ranks ...
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(ranks[0]["weights"]) == 2
    assert len(ranks[0]["selections"]) == 3
    for epoch, selected in enumerate(ranks[0]["selections"]):
        seen0, seen1 = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(seen0) == len(seen1) == 8
        assert not set(seen0) & set(seen1)  # ... split into disjoint shards ...
        assert sorted(seen0 + seen1) == sorted(selected)  # ... that together are exactly the selection
    # the per-epoch files are written once, by the main process
    epoch_file = json.loads((tmp_path / "data_selection" / "epoch-001.json").read_text())
    assert epoch_file["positions"] == ranks[0]["selections"][1]
    # each rank scored half of the epoch's rows; the gathered scores cover all of them
    assert len(epoch_file["scores"]) == 16 and None not in epoch_file["scores"]
