"""Held-out loss per label: aggregation, agreement with a naive forward pass, the epoch callback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_dataselect.errors import InputError
from hf_dataselect.evaluation import EvalSet, HeldOutLossCallback, group_losses, heldout_loss

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Translate 'dog' to French.", "Say hello.", "Count to three."]
RESPONSES = ["4", "Blue is a colour.", "chien", "Hello!", "One, two, three."]
LABELS = ["math", "open", "translate", "open", "math"]


def test_group_losses_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    row_loss = rng.uniform(0.5, 4.0, size=40)
    tokens = rng.integers(1, 30, size=40)
    labels = [f"t{i % 7}" for i in range(40)]
    result = group_losses(row_loss, tokens, labels)
    assert result.labels == sorted(set(labels))
    for label, loss, count, rows in zip(result.labels, result.loss, result.tokens, result.rows, strict=True):
        members = [i for i, lab in enumerate(labels) if lab == label]
        expected = sum(row_loss[i] * tokens[i] for i in members) / sum(tokens[i] for i in members)
        assert loss == pytest.approx(expected)
        assert count == sum(tokens[i] for i in members)
        assert rows == len(members)
    assert result.macro == pytest.approx(np.mean(result.loss))
    assert result.overall == pytest.approx(np.sum(row_loss * tokens) / np.sum(tokens))
    payload = result.to_dict()
    assert payload["labels"] == 7 and payload["rows"] == 40
    assert set(payload["per_label"]) == set(labels)


def test_macro_and_overall_differ_when_one_label_has_long_responses():
    # label "long": 1 row of 100 tokens at loss 1; label "short": 1 row of 1 token at loss 5
    result = group_losses(np.array([1.0, 5.0]), np.array([100, 1]), ["long", "short"])
    assert result.macro == pytest.approx(3.0)
    assert result.overall == pytest.approx((100 + 5) / 101)


def test_without_labels_everything_is_one_group():
    result = group_losses(np.array([1.0, 3.0]), np.array([1, 3]), None)
    assert result.labels == ["all"]
    assert result.macro == result.overall == pytest.approx(2.5)


def _naive_response_nll(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """Mean NLL of the response tokens, computed one row at a time with the model's own loss."""
    import torch

    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([full_ids]), labels=torch.tensor([labels]))
    return float(out.loss), len(full_ids) - len(prompt_ids)


def test_heldout_loss_equals_a_naive_per_row_computation(tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    eval_set = EvalSet(PROMPTS, RESPONSES, LABELS)
    result = heldout_loss(model, tokenizer, eval_set, batch_size=2)
    naive = [_naive_response_nll(model, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    np.testing.assert_allclose(result.row_loss, [loss for loss, _ in naive], rtol=1e-5)
    for label, loss in zip(result.labels, result.loss, strict=True):
        members = [naive[i] for i, lab in enumerate(LABELS) if lab == label]
        expected = sum(loss_ * n for loss_, n in members) / sum(n for _, n in members)
        assert loss == pytest.approx(expected, rel=1e-5)


def test_eval_set_from_dataset_reads_any_format_and_checks_input():
    from datasets import Dataset

    ds = Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"], "task": ["t1", "t2"]})
    eval_set = EvalSet.from_dataset(ds, label_column="task", name="demo")
    assert (
        eval_set.prompts == ["a", "b"]
        and eval_set.responses == ["x", "y"]
        and eval_set.labels == ["t1", "t2"]
    )
    with pytest.raises(InputError, match="needs column"):
        EvalSet.from_dataset(ds, label_column="missing")
    with pytest.raises(InputError, match="no separate response"):
        EvalSet.from_dataset(Dataset.from_dict({"text": ["only text"]}))
    with pytest.raises(InputError, match="no response to score"):
        EvalSet(["p1", "p2"], ["ok", "  "])
    with pytest.raises(InputError, match="labels for"):
        EvalSet(["p1"], ["r1"], labels=["a", "b"])
    with pytest.raises(InputError, match="empty"):
        EvalSet([], [])


def test_callback_evaluates_after_the_requested_epochs(tiny_llama_path, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hf_dataselect.recipes import sft_examples

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    train = sft_examples(
        Dataset.from_dict({"prompt": PROMPTS * 4, "completion": RESPONSES * 4}), conversational=True
    )
    eval_set = EvalSet(PROMPTS, RESPONSES, LABELS, name="dev")
    log_file = tmp_path / "heldout.jsonl"
    callback = HeldOutLossCallback([eval_set], tokenizer, epochs=[1, 3], log_file=log_file)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 3] == [r["epoch"] for r in callback.records]
    assert set(records[0]["dev"]["per_label"]) == {"math", "open", "translate"}
    logged = [e for e in trainer.state.log_history if "dev_macro_loss" in e]
    assert [e["epoch"] for e in logged] == [1.0, 3.0]
    # the last record is the trained model's loss, recomputed independently
    final = heldout_loss(trainer.model, tokenizer, eval_set)
    assert records[-1]["dev"]["macro_loss"] == pytest.approx(final.macro, rel=1e-5)
    assert records[-1]["dev"]["macro_loss"] < records[0]["dev"]["macro_loss"]


def test_callback_rejects_bad_configuration(tiny_llama_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    eval_set = EvalSet(PROMPTS, RESPONSES)
    with pytest.raises(InputError, match="distinct names"):
        HeldOutLossCallback([eval_set, eval_set], tokenizer)
    with pytest.raises(InputError, match="counted from 1"):
        HeldOutLossCallback([eval_set], tokenizer, epochs=[0, 1])
