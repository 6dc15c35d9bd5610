"""Run by ``tests/test_embeddings_distributed.py`` under ``torchrun --standalone --nproc_per_node 2`` on CPU.

Every process embeds its shard through :func:`hf_dataselect.distributed.map_across_processes`, then writes
what it ended up with (``rank<N>.npy``; ``rank<N>_small.npy`` for the first 5 rows, one map batch) and what
it did (``rank<N>.json``: rows it embedded itself, the result's fingerprint and columns) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a save_to_disk folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from accelerate import PartialState
    from datasets import load_from_disk

    from hf_dataselect.distributed import map_across_processes
    from hf_dataselect.transforms.embed import Embeddings

    state = PartialState(cpu=True)  # gloo on CPU even where a GPU exists
    embedded: list[int] = []
    encode = Embeddings.encode

    def counting_encode(self: Embeddings, texts: list[str]) -> np.ndarray:
        embedded.append(len(texts))
        return encode(self, texts)

    Embeddings.encode = counting_encode  # the class, not the instance: the map fingerprint is unchanged

    dataset = load_from_disk(args.data)
    result = map_across_processes(dataset, Embeddings(device="cpu"), batch_size=8)
    rows_embedded = sum(embedded)
    # one map batch only: rank 1 gets an empty shard and must still end with every row
    small = map_across_processes(dataset.select(range(5)), Embeddings(device="cpu"), batch_size=8)

    out = Path(args.out)
    np.save(out / f"rank{state.process_index}.npy", np.asarray(result["embedding"], dtype=np.float32))
    np.save(out / f"rank{state.process_index}_small.npy", np.asarray(small["embedding"], dtype=np.float32))
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "rows_embedded": rows_embedded,
        "rows_embedded_small": sum(embedded) - rows_embedded,
        "fingerprint": result._fingerprint,
        "columns": result.column_names,
        "ids": list(result["id"]),
        "small_columns": small.column_names,
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
