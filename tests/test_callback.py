"""DataSelectionCallback with the stock SFTTrainer / Trainer and the tiny local Llama (no network)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from hf_dataselect.errors import InputError

pytest.importorskip("trl")

from scripts.callback_pool import (
    RowRecorder,
    epoch_marker,
    planted_pool,
    reward_like,
    sft_config,
)


def _sft(tiny_llama_path, pool, output_dir, callback, **overrides):
    from trl import SFTTrainer

    return SFTTrainer(
        model=str(tiny_llama_path),
        args=sft_config(str(output_dir), **overrides),
        train_dataset=pool,
        callbacks=[callback],
    )


def test_rows_the_model_sees_are_the_selection(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    selection = DataSelectionCallback(budget_per_epoch=16, scorer=reward_like, seed=3)
    trainer = selection.attach(_sft(tiny_llama_path, planted_pool(), tmp_path, selection))
    recorder = RowRecorder(trainer.model, trainer.train_dataset)
    trainer.add_callback(epoch_marker(recorder))
    trainer.train()

    assert trainer.state.global_step == 3 * 4  # 16 rows / batch 4, three epochs: fixed from the start
    assert len(selection.selections) == 3
    for seen, selected in zip(recorder.epochs, selection.selections, strict=True):
        assert Counter(seen) == Counter(selected.tolist())  # every selected row exactly once, nothing else
    everything = np.concatenate(selection.selections)
    assert len(np.unique(everything)) == 48  # later epochs never repeat a row

    folder = tmp_path / "data_selection"
    assert sorted(p.name for p in folder.iterdir()) == [
        "clusters.json",
        "config.json",
        "epoch-000.json",
        "epoch-001.json",
        "epoch-002.json",
        "selection.json",
    ]
    for epoch, selected in enumerate(selection.selections):
        record = json.loads((folder / f"epoch-{epoch:03d}.json").read_text())
        assert record["positions"] == selected.tolist()
        assert record["row_ids"] == selected.tolist()  # row_id == position in this pool
        assert len(record["weights"]) == 4 and math.isclose(sum(record["weights"]), 1.0)
    first = json.loads((folder / "epoch-000.json").read_text())
    assert first["quota"] == [4, 4, 4, 4]  # kMQ: proportional to the (equal) cluster sizes
    assert all(s is not None for s in first["scores"])
    summary = json.loads((folder / "selection.json").read_text())
    assert [e["positions"] for e in summary["epochs"]] == [s.tolist() for s in selection.selections]


def test_planted_noise_cluster_loses_weight(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    pool = planted_pool(noise_cluster=2)
    selection = DataSelectionCallback(budget_per_epoch=16, scorer=reward_like, temperature=0.1, seed=0)
    trainer = selection.attach(_sft(tiny_llama_path, pool, tmp_path, selection, num_train_epochs=2))
    trainer.train()

    first_round, second_round = selection.engine.history
    weights = first_round.weights_after
    assert np.argmin(weights) == 2 and weights[2] < 0.25 / 10
    assert second_round.quota[2] < first_round.quota[2]
    assert second_round.quota.sum() == 16
    # the update is w · softmax(s / T), renormalised, with s the mean reward-like score per cluster
    scores = np.array([first_round.scores[int(p)] for p in first_round.positions])
    clusters = np.asarray(pool["cluster"])[first_round.positions]
    means = np.array([scores[clusters == j].mean() for j in range(4)])
    expected = np.full(4, 0.25) * np.exp(means / 0.1)
    np.testing.assert_allclose(weights, expected / expected.sum(), rtol=1e-12)


def test_reward_scorer_runs_with_the_tiny_reward_model(tiny_llama_path, tiny_reward_model_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    selection = DataSelectionCallback(
        budget_per_epoch=8,
        scorer="reward",
        reward_model=str(tiny_reward_model_path),
        max_new_tokens=4,
        seed=1,
    )
    trainer = selection.attach(
        _sft(tiny_llama_path, planted_pool(8), tmp_path, selection, num_train_epochs=2)
    )
    trainer.train()

    record = json.loads((tmp_path / "data_selection" / "epoch-000.json").read_text())
    gold, generated = record["score_details"]["gold_reward"], record["score_details"]["generated_reward"]
    np.testing.assert_allclose(record["scores"], np.subtract(gold, generated))
    assert all(math.isfinite(w) for w in record["weights_after"])
    assert record["scorer"]["name"] == "reward"


def test_loss_scorer_and_kmeans_from_an_embedding_column(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    pool = planted_pool(6).remove_columns("cluster")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    embeddings = centres[np.arange(len(pool)) % 3] + 0.01 * rng.normal(size=(len(pool), 8))
    pool = pool.add_column("embedding", embeddings.astype(np.float32).tolist())
    selection = DataSelectionCallback(budget_per_epoch=4, scorer="loss", k=3, seed=0)
    trainer = selection.attach(
        _sft(tiny_llama_path, pool, tmp_path, selection, num_train_epochs=2, per_device_train_batch_size=2)
    )
    trainer.train()

    clusters = json.loads((tmp_path / "data_selection" / "clusters.json").read_text())
    labels = np.asarray(clusters["labels"])
    assert clusters["k"] == 3
    for j in range(3):  # k-means recovers the three planted groups
        assert len(set(labels[np.arange(len(pool)) % 3 == j])) == 1
    first = selection.engine.history[0]
    assert np.isfinite(first.cluster_scores[np.unique(labels[first.positions])]).all()


def test_plain_trainer_with_pool_and_dropped_rows(tiny_llama_path, tmp_path):
    """transformers.Trainer on a tokenized dataset that lost rows; the pool (with text) maps through row_id."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from hf_dataselect.training import DataSelectionCallback

    pool = planted_pool(8)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_path))

    def tokenize(row):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return {"input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}

    train = pool.map(tokenize, remove_columns=["messages", "cluster"])
    dropped = {3, 10, 17}
    train = train.filter(lambda row: row["row_id"] not in dropped)  # e.g. a length filter
    selection = DataSelectionCallback(budget_per_epoch=6, scorer=reward_like, pool=pool, seed=0)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(str(tiny_llama_path)),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            num_train_epochs=3,
            per_device_train_batch_size=3,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[selection],
    )
    selection.attach(trainer)
    recorder = RowRecorder(trainer.model, train)
    trainer.add_callback(epoch_marker(recorder))
    trainer.train()

    train_ids = np.asarray(train["row_id"])
    for seen, selected in zip(recorder.epochs, selection.selections, strict=True):
        assert Counter(train_ids[seen].tolist()) == Counter(selected.tolist())  # pool position == row_id here
    assert not dropped & set(np.concatenate(selection.selections).tolist())


# -- bad configurations fail before training ------------------------------------------------------------------
def test_budget_larger_than_the_pool(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    pool = planted_pool(4)  # 16 rows
    selection = DataSelectionCallback(budget_per_epoch=17, scorer=reward_like)
    with pytest.raises(InputError, match="larger than the pool"):
        selection.attach(_sft(tiny_llama_path, pool, tmp_path, selection))
    selection = DataSelectionCallback(budget_per_epoch=6, scorer=reward_like)
    with pytest.raises(InputError, match=r"3 epochs × 6 rows per epoch = 18 rows, but the pool has 16"):
        selection.attach(_sft(tiny_llama_path, pool, tmp_path, selection))


def test_scorer_returning_nan_fails_before_the_first_step(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    def broken(prompts, responses):
        return [float("nan")] * len(prompts)

    selection = DataSelectionCallback(budget_per_epoch=8, scorer=broken)
    trainer = selection.attach(_sft(tiny_llama_path, planted_pool(8), tmp_path, selection))
    with pytest.raises(InputError, match=r"trial run before training.*NaN"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_scorer_turning_nan_later_fails_with_a_clear_error(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    calls = []

    def late_nan(prompts, responses):
        calls.append(len(prompts))
        return [float("nan") if len(calls) > 1 else 0.0] * len(prompts)

    selection = DataSelectionCallback(budget_per_epoch=8, scorer=late_nan)
    trainer = selection.attach(_sft(tiny_llama_path, planted_pool(8), tmp_path, selection))
    with pytest.raises(InputError, match=r"epoch 0.*NaN or infinite scores for 8 of 8 rows"):
        trainer.train()


def test_missing_prompt_or_response(tiny_llama_path, tmp_path):
    from datasets import Dataset

    from hf_dataselect.training import DataSelectionCallback

    rows = planted_pool(4).to_list()
    rows[5]["messages"][1]["content"] = ""
    selection = DataSelectionCallback(budget_per_epoch=4, scorer=reward_like)
    with pytest.raises(InputError, match=r"1 row\(s\) have no response, e.g. row position\(s\) \[5\]"):
        selection.attach(_sft(tiny_llama_path, Dataset.from_list(rows), tmp_path, selection))

    rows = planted_pool(4).to_list()
    rows[2]["messages"][0]["content"] = " "
    selection = DataSelectionCallback(budget_per_epoch=4, scorer=reward_like)
    with pytest.raises(InputError, match=r"have no prompt, e.g. row position\(s\) \[2\]"):
        selection.attach(_sft(tiny_llama_path, Dataset.from_list(rows), tmp_path, selection))

    text_only = Dataset.from_list([{"text": f"just text {i}"} for i in range(16)])
    selection = DataSelectionCallback(budget_per_epoch=4, scorer=reward_like)
    with pytest.raises(InputError, match="needs a prompt and a gold response"):
        selection.attach(_sft(tiny_llama_path, text_only, tmp_path, selection))


def test_other_bad_configurations(tiny_llama_path, tmp_path):
    from hf_dataselect.training import DataSelectionCallback

    with pytest.raises(InputError, match="needs reward_model="):
        DataSelectionCallback(budget_per_epoch=4, scorer="reward")
    with pytest.raises(InputError, match="has no option"):
        DataSelectionCallback(budget_per_epoch=4, budget=3)
    with pytest.raises(InputError, match="Unknown scorer"):
        DataSelectionCallback(budget_per_epoch=4, scorer="bleu")
    with pytest.raises(InputError, match="allocation"):
        DataSelectionCallback(budget_per_epoch=4, scorer="loss", allocation="equal")
    selection = DataSelectionCallback(budget_per_epoch=4, scorer=reward_like)
    with pytest.raises(InputError, match="packing"):
        selection.attach(_sft(tiny_llama_path, planted_pool(4), tmp_path, selection, packing=True))

    selection = DataSelectionCallback(budget_per_epoch=4, scorer=reward_like)
    trainer = _sft(tiny_llama_path, planted_pool(4), tmp_path, selection)  # attach() forgotten
    with pytest.raises(InputError, match="not attached"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_persistent_dataloader_workers_follow_the_selection(tiny_llama_path, tmp_path):
    """The sampler runs in the main process, so persistent workers still load each epoch's new rows."""
    from hf_dataselect.training import DataSelectionCallback

    selection = DataSelectionCallback(budget_per_epoch=8, scorer=reward_like, seed=4)
    trainer = _sft(
        tiny_llama_path,
        planted_pool(8),
        tmp_path,
        selection,
        num_train_epochs=2,
        dataloader_num_workers=1,
        dataloader_persistent_workers=True,
    )
    selection.attach(trainer)
    recorder = RowRecorder(trainer.model, trainer.train_dataset)
    trainer.add_callback(epoch_marker(recorder))
    trainer.train()
    assert [sorted(seen) for seen in recorder.epochs] == [s.tolist() for s in selection.selections]
    assert not set(selection.selections[0].tolist()) & set(selection.selections[1].tolist())


def test_config_parses_like_a_recipe():
    """DataSelectionConfig is a plain dataclass that HfArgumentParser (CLI flags, YAML recipes) can fill."""
    from transformers import HfArgumentParser

    from hf_dataselect.training import DataSelectionCallback, DataSelectionConfig

    (config,) = HfArgumentParser(DataSelectionConfig).parse_dict(
        {
            "budget_per_epoch": 64,
            "scorer": "perplexity",
            "max_new_tokens": 32,
            "scorer_options": {"batch_size": 2},
        }
    )
    selection = DataSelectionCallback(config)
    assert selection.scorer.name == "perplexity" and selection.scorer.max_new_tokens == 32
    assert selection.scorer.batch_size == 2
    with pytest.raises(InputError, match="either config= or keyword options"):
        DataSelectionCallback(config, budget_per_epoch=3)
