"""Embeddings: pooling against a per-text reference, text parts, formats, errors, caching, num_proc."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import join_parts
from hf_dataselect.transforms.embed import Embeddings, plan_batches

PROMPTS = [
    "Can brain cells move?",
    "Write a haiku about autumn leaves falling into a quiet pond at dusk.",
    "What is 12 + 30?",
    "Translate 'good morning' into French, and explain when the phrase is used in everyday conversation.",
    "Name three primary colours.",
    "Summarise: the committee met twice and agreed to postpone the vote until the spring session.",
]
RESPONSES = [
    "Yes, some do: neuronal precursors migrate long distances during development.",
    "Leaves drift and settle / ripples fold the amber light / the pond keeps its breath",
    "42",
    "Bonjour. It is the usual greeting from morning until the afternoon.",
    "Red, yellow and blue.",
    "The vote was postponed to spring after two meetings.",
]


@pytest.fixture(scope="module")
def alpaca_rows():
    from datasets import Dataset

    return Dataset.from_dict({"instruction": PROMPTS, "output": RESPONSES})


@pytest.fixture(scope="module")
def minilm_fp32(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path), AutoModel.from_pretrained(minilm_path).eval()


def _naive_mean(tokenizer, model, texts, max_length=256):
    """One unpadded text at a time: mean of the token states, then L2 normalisation."""
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**ids).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    return np.stack(out)


def test_mean_pooling_equals_per_text_reference(minilm_fp32):
    tokenizer, model = minilm_fp32
    texts = [join_parts(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    # tiny batches with mixed lengths: padding must not leak into the mean
    got = Embeddings(dtype="float32", batch_size=4, max_batch_tokens=64).encode(texts)
    np.testing.assert_allclose(got, _naive_mean(tokenizer, model, texts), atol=2e-5)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)


def test_last_token_pooling_on_a_decoder(tiny_llama_path):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a short one", "a somewhat longer sentence with more tokens in it", "mid length text"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    with torch.inference_mode():
        expected = np.stack(
            [
                torch.nn.functional.normalize(
                    model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1], dim=0
                ).numpy()
                for t in texts
            ]
        )
    transform = Embeddings(tiny_llama_path, dtype="float32", batch_size=2)
    got = transform.encode(texts)
    assert transform.runtime().pooling == "last"
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # an explicit mean pooling gives something else
    assert not np.allclose(Embeddings(tiny_llama_path, dtype="float32", pooling="mean").encode(texts), got)


def test_normalisation_and_unnormalised_option(minilm_fp32):
    tokenizer, model = minilm_fp32
    texts = PROMPTS[:3]
    normalised = Embeddings(dtype="float32").encode(texts)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-6)
    raw = Embeddings(dtype="float32", normalize=False).encode(texts)
    with torch.inference_mode():
        ids = tokenizer(texts[0], return_tensors="pt")
        mean = model(**ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(raw[0], mean, atol=2e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_prompt_only_and_prompt_response(alpaca_rows):
    full = alpaca_rows.map(Embeddings(dtype="float32"), batched=True)
    prompt_only = alpaca_rows.map(Embeddings(dtype="float32", text="prompt"), batched=True)
    reference = Embeddings(dtype="float32")
    joined = [f"{p}\n\n{r}" for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    np.testing.assert_allclose(np.array(full["embedding"]), reference.encode(joined), atol=1e-5)
    np.testing.assert_allclose(np.array(prompt_only["embedding"]), reference.encode(PROMPTS), atol=1e-5)
    assert not np.allclose(np.array(full["embedding"]), np.array(prompt_only["embedding"]))


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (
            {
                "messages": [
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                    for p, r in zip(PROMPTS[:2], RESPONSES[:2], strict=True)
                ]
            },
            [f"{p}\n\n{r}" for p, r in zip(PROMPTS[:2], RESPONSES[:2], strict=True)],
        ),
        ({"conversations": [[PROMPTS[0], RESPONSES[0]]]}, [f"{PROMPTS[0]}\n\n{RESPONSES[0]}"]),
        (
            {"question": PROMPTS[:2], "answer": RESPONSES[:2]},
            [f"{p}\n\n{r}" for p, r in zip(PROMPTS[:2], RESPONSES[:2], strict=True)],
        ),
        ({"text": PROMPTS[:2]}, PROMPTS[:2]),
        (
            {"instruction": ["Add the numbers."], "input": ["2 and 3"], "output": ["5"]},
            ["Add the numbers.\n\n2 and 3\n\n5"],
        ),
    ],
)
def test_formats_are_detected(columns, expected):
    transform = Embeddings(dtype="float32")
    out = transform(columns)["embedding"]
    np.testing.assert_allclose(out, transform.encode(expected), atol=1e-5)


def test_named_columns_and_formatter():
    batch = {"q": ["What is 2 + 2?"], "a": ["4"], "noise": ["ignored"]}
    named = Embeddings(dtype="float32", prompt_column="q", response_column="a")(batch)["embedding"]
    formatted = Embeddings(dtype="float32", formatter=lambda row: (row["q"], row["a"]))(batch)["embedding"]
    reference = Embeddings(dtype="float32").encode(["What is 2 + 2?\n\n4"])
    np.testing.assert_allclose(named, reference, atol=1e-5)
    np.testing.assert_allclose(formatted, reference, atol=1e-5)


def test_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = [join_parts(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    reference = SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=True)
    default = Embeddings().encode(texts)  # bf16 on CPUs with native bf16, else fp32
    exact = Embeddings(dtype="float32").encode(texts)
    assert (default * reference).sum(1).min() >= 0.99
    assert (exact * reference).sum(1).min() >= 0.9999


def test_plan_batches_respects_budgets():
    lengths = np.array([5, 300, 17, 17, 64, 1, 250, 33, 90, 12])
    batches = list(plan_batches(lengths, batch_size=3, max_batch_tokens=320))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)
    for chosen in batches:
        assert len(chosen) <= 3
        assert len(chosen) == 1 or len(chosen) * lengths[chosen].max() <= 320
    assert [len(b) for b in batches] == [1, 1, 3, 3, 2]  # 300 | 250 | 90,64,33 | 17,17,12 | 5,1


def test_option_errors():
    with pytest.raises(InputError, match="text must be one of"):
        Embeddings(text="answer")
    with pytest.raises(InputError, match="pooling must be one of"):
        Embeddings(pooling="max")
    with pytest.raises(InputError, match="dtype must be one of"):
        Embeddings(dtype="int4")
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        Embeddings(batch_size=0)
    with pytest.raises(InputError, match="max_batch_tokens"):
        Embeddings(max_batch_tokens=-5)


def test_batch_errors_and_empty_batch():
    transform = Embeddings(dtype="float32")
    empty = transform({"prompt": [], "completion": []})["embedding"]
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(InputError, match=r"no prompt \+ response text.*\[1\]"):
        transform({"prompt": ["fine", "  "], "completion": ["ok", ""]})
    with pytest.raises(InputError, match="Cannot tell how to read rows"):
        transform({"foo": ["bar"]})
    with pytest.raises(InputError, match="no prompt text"):
        Embeddings(text="prompt")({"prompt": [""], "completion": ["only an answer"]})


def test_pickled_state_is_configuration_only():
    transform = Embeddings(dtype="float32")
    transform.encode(["load the model"])
    state = transform.__getstate__()
    assert not any(k.startswith("_runtime") for k in state)
    assert len(pickle.dumps(transform)) < 2000
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == Embeddings(dtype="float32") and "_runtime_object" not in clone.__dict__


def _count_model_loads(monkeypatch):
    from hf_dataselect import models

    calls = []
    real = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("model"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


def test_second_identical_map_is_a_cache_hit(tmp_path, monkeypatch, alpaca_rows, tiny_llama_path):
    from datasets import load_from_disk

    alpaca_rows.save_to_disk(str(tmp_path / "pool"))
    calls = _count_model_loads(monkeypatch)

    first = load_from_disk(str(tmp_path / "pool")).map(Embeddings(), batched=True)
    assert len(calls) == 1
    again = load_from_disk(str(tmp_path / "pool")).map(Embeddings(), batched=True)
    assert len(calls) == 1, "the model was loaded again: the second map was not a cache hit"
    assert again.cache_files == first.cache_files and again._fingerprint == first._fingerprint
    np.testing.assert_array_equal(np.array(again["embedding"]), np.array(first["embedding"]))

    other_part = load_from_disk(str(tmp_path / "pool")).map(Embeddings(text="prompt"), batched=True)
    other_model = load_from_disk(str(tmp_path / "pool")).map(Embeddings(tiny_llama_path), batched=True)
    assert len(calls) == 3
    assert (
        len(
            {
                first.cache_files[0]["filename"],
                other_part.cache_files[0]["filename"],
                other_model.cache_files[0]["filename"],
            }
        )
        == 3
    )


def test_cache_hit_for_a_json_file_dataset(tmp_path, monkeypatch):
    import json

    from datasets import load_dataset

    path = tmp_path / "pool.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES, strict=True)
        )
    )
    calls = _count_model_loads(monkeypatch)

    def load():
        return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))

    first = load().map(Embeddings(dtype="float32"), batched=True)
    second = load().map(Embeddings(dtype="float32"), batched=True)
    assert len(calls) == 1
    assert second.cache_files == first.cache_files


def test_num_proc_matches_single_process_and_sizes_threads(alpaca_rows):
    from hf_dataselect.distributed import configure_torch_threads, in_pool_worker

    rows = alpaca_rows.select([i % len(PROMPTS) for i in range(12)])
    # Workers run one torch thread each and the main process two. Matmul kernels may reduce in a different
    # order with a different thread count (oneDNN's AMX bf16 kernels do), so the two agree to the rounding
    # of the model's dtype, not bit for bit: 1e-3 for bf16 weights, 1e-5 in float32.
    for dtype, atol in (("auto", 1e-3), ("float32", 1e-5)):
        single = np.array(rows.map(Embeddings(dtype=dtype), batched=True, batch_size=3)["embedding"])
        double = np.array(
            rows.map(Embeddings(dtype=dtype), batched=True, batch_size=3, num_proc=2)["embedding"]
        )
        np.testing.assert_allclose(double, single, atol=atol)

    def threads(batch):
        n = len(batch["instruction"])
        return {"worker": [in_pool_worker()] * n, "threads": [configure_torch_threads()] * n}

    seen = rows.map(threads, batched=True, batch_size=3, num_proc=2)
    assert set(seen["worker"]) == {True} and set(seen["threads"]) == {1}
    assert not in_pool_worker()  # the main process keeps its own setting
    before = torch.get_num_threads()
    assert configure_torch_threads() == before
