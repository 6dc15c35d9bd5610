"""Training: activations at a hookpoint (special tokens dropped), FVU going down, AuxK reviving dead latents,
checkpoints that resume exactly, and input errors before any work."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hf_dataselect.errors import InputError
from hf_dataselect.sae import train as train_module
from hf_dataselect.sae.activations import load_reader, resolve_hookpoint
from hf_dataselect.sae.model import TopKSAE
from hf_dataselect.sae.train import SAETrainer, SAETrainingConfig, geometric_median, train_sae

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "the",
    "sea",
    "and",
    "the",
    "wind",
    "sing",
    "of",
    "numbers",
    "poems",
    "sorting",
    "translation",
    "answers",
    "questions",
    "summaries",
    "code",
    "functions",
    "data",
    "selection",
    "diversity",
]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts():
    return make_texts(160)


def test_hidden_states_drop_special_tokens_and_padding(tiny_llama_path):
    from transformers import AutoModel, AutoTokenizer

    reader = load_reader(str(tiny_llama_path), 0, batch_size=4)
    model = AutoModel.from_pretrained(str(tiny_llama_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_path))
    sample = ["the sea and the wind", "a", "sorting numbers 5 3 9 and 1 in order please"]
    batches = list(reader.batches(sample))
    assert len(batches) == 1
    batch = batches[0]
    offsets = [0, *torch.as_tensor(batch.lengths).cumsum(0).tolist()]
    for position, row in enumerate(batch.rows):
        encoded = tokenizer(sample[row], return_tensors="pt")
        assert encoded["input_ids"][0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            expected = model(**encoded, output_hidden_states=True).hidden_states[1][
                0, 1:
            ]  # block 0, BOS dropped
        got = batch.activations[offsets[position] : offsets[position + 1]]
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5)


def test_hookpoints_by_path_alias_and_index(tiny_llama_path):
    reader = load_reader(str(tiny_llama_path), "model.layers.1")
    model = reader.model
    assert reader.hookpoint.name == "layers.1" and reader.hookpoint.layer_index == 1
    for alias in ("layers.1", 1, "1", -1, "-1", None):
        assert resolve_hookpoint(model, alias).module is reader.hookpoint.module
    assert resolve_hookpoint(model, "layers.0.mlp").name == "layers.0.mlp"
    with pytest.raises(InputError, match=r"not a module of LlamaModel.*layers\.0 \.\. layers\.1"):
        resolve_hookpoint(model, "encoder.layer.3")
    with pytest.raises(InputError, match="out of range: the model has 2 blocks"):
        resolve_hookpoint(model, 5)


def test_training_lowers_fvu_and_records_metadata(tiny_llama_path, texts, tmp_path):
    sae = train_sae(
        str(tiny_llama_path),
        texts,
        "model.layers.1",
        output_dir=tmp_path / "out",
        expansion_factor=4,
        k=8,
        batch_tokens=256,
        epochs=3,
        lr_warmup_steps=5,
        log_every=2,
        eval_fraction=0.1,
        progress=False,
    )
    history = sae.training_history
    assert history[-1]["fvu"] < 0.6 * history[0]["fvu"]
    meta = sae.metadata
    assert meta["hookpoint"] == "layers.1" and meta["k"] == 8 and meta["num_latents"] == 256
    assert meta["training_rows"] == 144 and meta["eval_rows"] == 16
    assert meta["training_tokens"] == meta["training_steps"] * 256
    assert meta["special_tokens_excluded"] is True
    assert 0 < meta["eval_fvu"] < 1 and meta["l0"] == pytest.approx(8.0)
    assert meta["distinct_training_tokens"] >= meta["training_steps"] * 256 / 3
    assert (tmp_path / "out" / "layers.1" / "sae.safetensors").is_file()
    assert (tmp_path / "out" / "README.md").is_file()


def _synthetic_run(auxk_alpha: float, steps: int = 150) -> tuple[float, float]:
    """Half of the latents start with encoder rows too weak to win a top-k slot (dead from the start)."""
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(48, 16, generator=generator), dim=1)

    def batch(n: int = 256) -> torch.Tensor:
        codes = torch.zeros(n, 48)
        codes.scatter_(
            1, torch.randint(0, 48, (n, 3), generator=generator), torch.rand(n, 3, generator=generator) + 0.5
        )
        return codes @ dictionary

    sae = TopKSAE(16, 64, 4, seed=0)
    with torch.no_grad():
        sae.encoder.weight[:32] *= 0.05
    config = SAETrainingConfig(
        lr=3e-3, lr_warmup_steps=1, lr_decay_fraction=0, auxk_alpha=auxk_alpha, dead_tokens_threshold=512
    )
    trainer = SAETrainer(sae, config, total_steps=steps)
    for _ in range(steps):
        metrics = trainer.step(batch())
    with torch.no_grad():
        values, indices = sae.encode(batch(4096))
    fired = torch.zeros(64, dtype=torch.bool)
    fired[indices[values > 0]] = True
    return metrics["dead_fraction"], float((~fired[:32]).float().mean())


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP overhead (and contention on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_auxk_revives_dead_latents(one_thread):
    dead_without, weak_silent_without = _synthetic_run(auxk_alpha=0.0)
    dead_with, weak_silent_with = _synthetic_run(auxk_alpha=1 / 32)
    assert dead_without == pytest.approx(0.5) and weak_silent_without == 1.0
    assert dead_with < 0.25 and weak_silent_with < 0.25


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("cache_activations", [True, False])
def test_interrupted_training_resumes_exactly(
    tiny_llama_path, texts, tmp_path, monkeypatch, cache_activations
):
    options = dict(
        expansion_factor=2,
        k=4,
        batch_tokens=128,
        max_tokens=128 * 12,
        lr_warmup_steps=2,
        cache_activations=cache_activations,
        buffer_tokens=512,
        progress=False,
    )
    reference = train_sae(str(tiny_llama_path), texts, 1, **options)

    original_step = SAETrainer.step

    def failing_step(self, batch):
        if self.step_count == 7:
            raise _Interrupted
        return original_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", failing_step)
    with pytest.raises(_Interrupted):
        train_sae(str(tiny_llama_path), texts, 1, checkpoint_dir=tmp_path, checkpoint_every=5, **options)
    monkeypatch.setattr(SAETrainer, "step", original_step)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train_sae(str(tiny_llama_path), texts, 1, checkpoint_dir=tmp_path, **options)
    # a checkpoint written before an option existed (here lr_scale) resumes as if it had the option's default
    state_file = next(tmp_path.rglob("state.json"))
    state = json.loads(state_file.read_text())
    del state["config"]["lr_scale"]
    state_file.write_text(json.dumps(state))
    resumed = train_sae(str(tiny_llama_path), texts, 1, checkpoint_dir=tmp_path, resume=True, **options)
    assert resumed.metadata["training_steps"] == 12
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    with pytest.raises(InputError, match=r"option\(s\) \['k'\] differ"):
        train_sae(str(tiny_llama_path), texts, 1, checkpoint_dir=tmp_path, resume=True, **{**options, "k": 3})


def test_geometric_median_minimises_the_sum_of_distances():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    points[:20] += 50  # outliers pull the mean, not the median
    median = geometric_median(points)
    directions = torch.nn.functional.normalize(points - median, dim=1)
    assert directions.sum(0).norm() < 1.0  # the optimality condition: unit vectors to the points cancel
    assert (points - median).norm(dim=1).sum() < (points - points.mean(0)).norm(dim=1).sum()


def test_bad_options_fail_before_any_work(tiny_llama_path, texts, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(train_module, "split_texts", no_model)
    with pytest.raises(InputError, match="k must be ≥ 1"):
        train_sae(str(tiny_llama_path), texts, 1, k=0)
    with pytest.raises(InputError, match="lr_scale must be positive"):
        train_sae(str(tiny_llama_path), texts, 1, lr_scale=0)
    with pytest.raises(InputError, match="Unknown SAE training option"):
        train_sae(str(tiny_llama_path), texts, 1, topk=3)
    with pytest.raises(InputError, match="resume=True needs checkpoint_dir"):
        train_sae(str(tiny_llama_path), texts, 1, resume=True)
    with pytest.raises(InputError, match="text must be one of"):
        train_sae(str(tiny_llama_path), texts, 1, text="everything")


def test_too_few_tokens_for_a_batch_is_an_input_error(tiny_llama_path):
    with pytest.raises(InputError, match="fewer than one batch"):
        train_sae(str(tiny_llama_path), ["a short text"], 1, batch_tokens=4096, progress=False)


def test_learning_rate_rule_and_its_scale():
    rule = 2e-4 / (6144 / 2**14) ** 0.5
    assert SAETrainingConfig().learning_rate(6144) == pytest.approx(rule)
    assert SAETrainingConfig(lr_scale=4.0).learning_rate(6144) == pytest.approx(4 * rule)
    assert SAETrainingConfig(lr=1e-3, lr_scale=4.0).learning_rate(6144) == 1e-3  # a given lr wins
