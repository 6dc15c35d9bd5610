"""Resuming from a checkpoint replays exactly the selections of an uninterrupted run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from scripts.callback_pool import planted_pool, sft_config

STATE_KEY = "hf_dataselect.DataSelectionCallback"


def _run(model_path, output_dir, resume_from=None):
    from trl import SFTTrainer

    from hf_dataselect.training import DataSelectionCallback

    # the gold-answer loss depends on the trained weights, so equal selections need equal training too
    selection = DataSelectionCallback(budget_per_epoch=16, scorer="loss", seed=5)
    trainer = SFTTrainer(
        model=str(model_path),
        args=sft_config(str(output_dir), save_strategy="steps", save_steps=2),
        train_dataset=planted_pool(),
        callbacks=[selection],
    )
    selection.attach(trainer)
    batches = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: batches.append(1) if module.training else None
    )
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    summary = json.loads((output_dir / "data_selection" / "selection.json").read_text())
    return len(batches), summary


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_selections(tiny_llama_path, tmp_path):
    batches, uninterrupted = _run(tiny_llama_path, tmp_path / "full")
    assert batches == 12 and len(uninterrupted["epochs"]) == 3  # 4 steps per epoch, checkpoints every 2 steps

    # step 6: in the middle of epoch 1; its selection is in the checkpoint, its scores are not yet
    state = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    rounds = state["stateful_callbacks"][STATE_KEY]["engine"]["rounds"]
    assert len(rounds) == 2 and rounds[0]["weights_after"] is not None and rounds[1]["weights_after"] is None
    copied = sorted(p.name for p in (tmp_path / "full" / "checkpoint-6" / "data_selection").iterdir())
    assert copied == ["clusters.json", "config.json", "epoch-000.json", "epoch-001.json"]

    batches, resumed = _run(tiny_llama_path, tmp_path / "mid", tmp_path / "full" / "checkpoint-6")
    assert batches == 6  # only the remaining steps were trained
    assert resumed["epochs"] == uninterrupted["epochs"]  # positions, digests and weights, exactly

    # step 4: saved after the last step of epoch 0 but before the epoch's scoring ran: the callback scores
    # those rows with the restored model at the start of epoch 1
    state = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"][STATE_KEY]["engine"]["rounds"][0]["weights_after"] is None
    batches, resumed = _run(tiny_llama_path, tmp_path / "end", tmp_path / "full" / "checkpoint-4")
    assert batches == 8
    assert resumed["epochs"] == uninterrupted["epochs"]

    # a different budget cannot continue this selection: refused before any step
    from trl import SFTTrainer

    from hf_dataselect.errors import InputError
    from hf_dataselect.training import DataSelectionCallback

    other = DataSelectionCallback(budget_per_epoch=12, scorer="loss", seed=5)
    trainer = SFTTrainer(
        model=str(tiny_llama_path),
        args=sft_config(str(tmp_path / "other")),
        train_dataset=planted_pool(),
        callbacks=[other],
    )
    other.attach(trainer)
    with pytest.raises(InputError, match="budget 16 and seed 5; this run uses 12 and 5"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
