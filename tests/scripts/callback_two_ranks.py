"""Two-process run of DataSelectionCallback (launched by tests/test_callback_distributed.py with torchrun).

Usage: torchrun --standalone --nproc_per_node 2 callback_two_ranks.py MODEL_DIR OUTPUT_DIR
Each rank writes rank-<r>.json with its selections and the rows its model actually received per epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.callback_pool import RowRecorder, epoch_marker, planted_pool, sft_config


def main(model_dir: str, output_dir: str) -> None:
    import torch.distributed as dist
    from trl import SFTTrainer

    from hf_dataselect.training import DataSelectionCallback

    selection = DataSelectionCallback(budget_per_epoch=16, scorer="loss", seed=2, scoring_batch_size=4)
    trainer = SFTTrainer(
        model=model_dir,
        args=sft_config(output_dir, per_device_train_batch_size=2, ddp_backend="gloo"),
        train_dataset=planted_pool(),
        callbacks=[selection],
    )
    selection.attach(trainer)
    recorder = RowRecorder(trainer.model, trainer.train_dataset)
    trainer.add_callback(epoch_marker(recorder))
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "selections": [s.tolist() for s in selection.selections],
        "weights": [
            r.weights_after.tolist() for r in selection.engine.history if r.weights_after is not None
        ],
        "seen": recorder.epochs,
        "global_step": trainer.state.global_step,
    }
    Path(output_dir, f"rank-{rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
