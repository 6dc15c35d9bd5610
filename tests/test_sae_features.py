"""SAEFeatures: per-row features against a naive reference, map caching, the pool-trained SAE, thresholds."""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import pytest
import torch

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import join_parts
from hf_dataselect.sae import train as train_module
from hf_dataselect.sae.model import TopKSAE
from hf_dataselect.transforms import sae_features
from hf_dataselect.transforms.sae_features import SAEFeatures, add_sae_features

ROWS = {
    "instruction": [
        "Write a short poem about the sea.",
        "What is 12 plus 30?",
        "Sort 5, 3, 9 and 1.",
        "Translate good morning into French.",
        "Summarize: the quick brown fox jumps over the lazy dog and runs away into the wind.",
        "def add(a, b):",
    ],
    "output": ["The sea and the wind.", "42", "1, 3, 5, 9", "bonjour", "A fox jumps.", "    return a + b"],
}


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    """A random 64 -> 256 TopK SAE (k = 8) saved for hookpoint layers.0 of the tiny Llama."""
    folder = tmp_path_factory.mktemp("sae")
    sae = TopKSAE(64, 256, 8, seed=0)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        sae.encoder.bias.normal_(generator=torch.Generator().manual_seed(2))
    sae.save_pretrained(folder, hookpoint="layers.0")
    return folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def _reference(model_path, sae_folder, texts, threshold):
    """Per row: hidden states of block 0 by transformers, special tokens dropped, dense TopK, max over tokens."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(model_path))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    sae = TopKSAE.from_pretrained(sae_folder, hookpoint="layers.0")
    rows = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded, output_hidden_states=True).hidden_states[1][0]
            keep = ~torch.isin(encoded["input_ids"][0], torch.tensor(tokenizer.all_special_ids))
            x = hidden[keep]
            pre = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
            values, indices = pre.topk(sae.k, dim=-1)
            pooled = torch.zeros_like(pre).scatter(1, indices, values).max(0).values
        active = torch.nonzero(pooled > threshold).squeeze(-1)
        rows.append((active.numpy(), pooled[active].numpy()))
    return rows


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_features_match_a_naive_reference(tiny_llama_path, sae_folder, pool, threshold):
    transform = SAEFeatures(
        model=str(tiny_llama_path),
        sae=str(sae_folder),
        hookpoint=0,
        threshold=threshold,
        batch_size=4,
        dtype="float32",
    )
    out = pool.map(transform, batched=True, batch_size=4)
    assert out.features["sae_indices"] == datasets.List(datasets.Value("int32"))
    assert out.features["sae_values"] == datasets.List(datasets.Value("float32"))
    assert out.features["sae_n_active"] == datasets.Value("int32")
    texts = [join_parts(p, r) for p, r in zip(ROWS["instruction"], ROWS["output"], strict=True)]
    expected = _reference(tiny_llama_path, sae_folder, texts, threshold or 0.0)
    for row, (indices, values) in zip(out, expected, strict=True):
        assert row["sae_indices"] == indices.tolist()
        np.testing.assert_allclose(row["sae_values"], values, rtol=1e-4, atol=1e-5)
        assert row["sae_n_active"] == len(indices)
    if threshold:
        assert min(min(v) for v in out["sae_values"] if v) > threshold


def test_auto_dtype_runs_the_model_in_the_fast_inference_dtype(tiny_llama_path, sae_folder, monkeypatch):
    from hf_dataselect import models

    monkeypatch.setattr(models, "fast_inference_dtype", lambda device: torch.bfloat16)
    texts = [join_parts(p, r) for p, r in zip(ROWS["instruction"], ROWS["output"], strict=True)]
    options = dict(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint=0)
    fast = SAEFeatures(**options)
    assert (
        fast.model_dtype() == torch.bfloat16
        and SAEFeatures(**options, dtype="fp32").model_dtype() == torch.float32
    )
    indices, values, counts = fast.encode(texts)
    assert next(fast.runtime().reader.model.parameters()).dtype == torch.bfloat16
    assert fast.runtime().sae.dtype == torch.float32  # the SAE encodes the bf16 hidden states cast to float32
    assert all(v.dtype == np.float32 and i.dtype == np.int32 for i, v in zip(indices, values, strict=True))
    exact_indices, _, exact_counts = SAEFeatures(**options, dtype="float32").encode(texts)
    overlap = [
        len(np.intersect1d(a, b)) / len(np.union1d(a, b)) for a, b in zip(indices, exact_indices, strict=True)
    ]
    assert min(overlap) > 0.5 and np.corrcoef(counts, exact_counts)[0, 1] > 0.9


def test_second_identical_map_is_a_cache_hit(tiny_llama_path, sae_folder, pool):
    first = SAEFeatures(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint="layers.0")
    mapped = pool.map(first, batched=True)
    assert "_runtime_object" in first.__dict__  # the first map ran it
    assert len(pickle.dumps(first)) < 4096  # configuration only, no model
    second = SAEFeatures(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint="layers.0")
    again = pool.map(second, batched=True)
    assert "_runtime_object" not in second.__dict__  # never called: read from the cache
    assert again._fingerprint == mapped._fingerprint and again.cache_files == mapped.cache_files
    other = SAEFeatures(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint="layers.0", threshold=0.3)
    assert pool.map(other, batched=True)._fingerprint != mapped._fingerprint


def test_auto_sae_is_trained_on_the_pool_once_and_reused(tiny_llama_path, pool, tmp_path, monkeypatch):
    options = dict(model=str(tiny_llama_path), hookpoint=1, batch_size=8)
    auto = {"expansion_factor": 2, "k": 4, "train_tokens": 600, "batch_tokens": 64}
    with pytest.raises(InputError, match=r"SAEFeatures.for_pool\(ds"):
        pool.map(SAEFeatures(**options), batched=True)
    transform = SAEFeatures.for_pool(pool, cache_dir=tmp_path, auto_sae=auto, progress=False, **options)
    assert transform.sae.startswith(str(tmp_path / "auto_sae")) and transform.hookpoint == "layers.1"
    assert transform.sae_sha256 and len(transform.sae_sha256) == 64
    sae = TopKSAE.from_pretrained(transform.sae)
    assert (sae.d_in, sae.num_latents, sae.k) == (64, 128, 4)
    assert sae.metadata["training_tokens"] == 576  # 600 rounded down to whole batches of 64

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached pool SAE must be reused")

    monkeypatch.setattr(train_module, "train_sae", must_not_train)
    again = SAEFeatures.for_pool(pool, cache_dir=tmp_path, auto_sae=auto, progress=False, **options)
    assert again == transform
    out = add_sae_features(pool, cache_dir=tmp_path, auto_sae=auto, progress=False, **options)
    assert all(
        n == len(i) and i == sorted(i) for n, i in zip(out["sae_n_active"], out["sae_indices"], strict=True)
    )
    assert min(out["sae_n_active"]) > 0


def test_auto_sae_trains_on_activations_of_the_dtype_the_features_use(
    tiny_llama_path, pool, tmp_path, monkeypatch
):
    from hf_dataselect import models

    monkeypatch.setattr(models, "fast_inference_dtype", lambda device: torch.bfloat16)
    seen = []
    real_train = train_module.train_sae

    def recording_train(*args, config, **kwargs):
        seen.append(config.model_dtype)
        return real_train(*args, config=config, **kwargs)

    monkeypatch.setattr(train_module, "train_sae", recording_train)
    auto = {"expansion_factor": 2, "k": 4, "train_tokens": 128, "batch_tokens": 64}
    options = dict(model=str(tiny_llama_path), hookpoint=1, batch_size=8)
    fast = SAEFeatures.for_pool(pool, cache_dir=tmp_path, auto_sae=auto, progress=False, **options)
    exact = SAEFeatures.for_pool(
        pool, cache_dir=tmp_path, auto_sae=auto, progress=False, dtype="float32", **options
    )
    assert seen == ["bfloat16", "float32"]  # one SAE per dtype, each cached under its own key
    assert fast.sae != exact.sae


def test_quantile_threshold_is_calibrated_once_on_the_pool(
    tiny_llama_path, sae_folder, pool, tmp_path, monkeypatch
):
    options = dict(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint=0, threshold_quantile=0.75)
    with pytest.raises(InputError, match="threshold_quantile is calibrated on the whole pool"):
        pool.map(SAEFeatures(**options), batched=True)
    transform = SAEFeatures.for_pool(pool, cache_dir=tmp_path, **options)
    # the reference: every non-zero token activation of every row (the pool is smaller than calibration_rows)
    texts = [join_parts(p, r) for p, r in zip(ROWS["instruction"], ROWS["output"], strict=True)]
    runner = transform.runtime()
    all_values = np.concatenate(
        [runner.token_activation_values([text]) for text in texts]  # row by row: batching does not matter
    )
    assert transform.calibrated_threshold == pytest.approx(float(np.quantile(all_values, 0.75)), rel=1e-5)

    def must_not_recompute(*args, **kwargs):
        raise AssertionError("the calibrated threshold must come from the cache")

    monkeypatch.setattr(sae_features._FeatureRunner, "token_activation_values", must_not_recompute)
    assert (
        SAEFeatures.for_pool(pool, cache_dir=tmp_path, **options).calibrated_threshold
        == transform.calibrated_threshold
    )
    out = pool.map(transform, batched=True)
    assert min(min(v) for v in out["sae_values"] if v) > transform.calibrated_threshold


def test_configuration_errors(tiny_llama_path, sae_folder, pool, tmp_path):
    with pytest.raises(InputError, match="not both"):
        SAEFeatures(threshold=1.0, threshold_quantile=0.5)
    with pytest.raises(InputError, match=r"threshold_quantile must be in \(0, 1\)"):
        SAEFeatures(threshold_quantile=1.5)
    with pytest.raises(InputError, match="text must be one of"):
        SAEFeatures(text="all")
    small = TopKSAE(32, 64, 4)
    small.save_pretrained(tmp_path, hookpoint="layers.0")
    wrong_width = SAEFeatures(model=str(tiny_llama_path), sae=str(tmp_path), hookpoint=0)
    with pytest.raises(InputError, match=r"reads 32-dimensional activations, but .* outputs width 64"):
        pool.map(wrong_width, batched=True)
    with pytest.raises(InputError, match=r"no SAE for hookpoint '1'; hookpoints it holds: \['layers.0'\]"):
        pool.map(SAEFeatures(model=str(tiny_llama_path), sae=str(sae_folder), hookpoint=1), batched=True)
