"""RewardScores / PerplexityScores: values, config-only pickling, cached maps, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from datasets import Dataset

from hf_dataselect import scoring
from hf_dataselect.errors import InputError
from hf_dataselect.transforms.quality import PerplexityScores, RewardScores

ROWS = {
    "instruction": ["What is 12 plus 30?", "Write a poem about the sea.", "Sort 5, 3, 9 and 1."],
    "output": ["The answer is 42.", "Waves roll over the quiet shore.", "1, 3, 5, 9"],
}


def test_reward_scores_column(tiny_reward_model_path):
    from hf_dataselect.models import load_model, load_tokenizer

    path = str(tiny_reward_model_path)
    ds = Dataset.from_dict(ROWS).map(RewardScores(path, batch_size=2), batched=True)
    expected = scoring.reward_scores(
        load_model(path, kind="sequence-classification"),
        load_tokenizer(path),
        ROWS["instruction"],
        ROWS["output"],
    )
    np.testing.assert_allclose(ds["quality"], expected, rtol=1e-5)


def test_perplexity_scores_column(tiny_llama_path):
    from hf_dataselect.models import load_model, load_tokenizer

    path = str(tiny_llama_path)
    ds = Dataset.from_dict(ROWS).map(PerplexityScores(path, column="ppl"), batched=True)
    nll = scoring.response_nll(
        load_model(path, kind="causal-lm"), load_tokenizer(path), ROWS["instruction"], ROWS["output"]
    )
    np.testing.assert_allclose(ds["ppl"], nll.perplexity, rtol=1e-5)

    text_rows = Dataset.from_dict({"text": ["a whole document", "another one"]})
    measured = text_rows.map(PerplexityScores(path), batched=True)["perplexity"]
    whole = scoring.response_nll(
        load_model(path, kind="causal-lm"),
        load_tokenizer(path),
        ["", ""],
        ["a whole document", "another one"],
    )
    np.testing.assert_allclose(measured, whole.perplexity, rtol=1e-5)


def test_pickled_state_is_config_only_and_maps_are_cached(tiny_llama_path, tmp_path):
    from datasets.fingerprint import Hasher

    transform = PerplexityScores(str(tiny_llama_path))
    before = Hasher.hash(transform)
    transform({"instruction": ["hi"], "output": ["there"]})  # loads the model
    assert transform.__dict__.get("_runtime_object") is not None
    assert Hasher.hash(transform) == before
    assert len(pickle.dumps(transform)) < 2000  # no weights inside

    Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "pool"))
    from datasets import load_from_disk

    pool = load_from_disk(str(tmp_path / "pool"))
    first = pool.map(PerplexityScores(str(tiny_llama_path)), batched=True)
    second = pool.map(PerplexityScores(str(tiny_llama_path)), batched=True)
    assert first.cache_files == second.cache_files  # the same fingerprint: the second map is a cache hit


def test_errors(tiny_reward_model_path):
    with pytest.raises(InputError, match="needs model="):
        RewardScores()
    with pytest.raises(InputError, match="batch_size"):
        PerplexityScores("x", batch_size=0)
    rows = Dataset.from_dict({"instruction": ["a", "b"], "output": ["ok", " "]})
    with pytest.raises(InputError, match="needs a response in every row"):
        rows.map(RewardScores(str(tiny_reward_model_path)), batched=True)
