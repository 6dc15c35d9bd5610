"""LM primitives (hf_dataselect.scoring) against naive per-row computations, and the scorers' formulas."""

from __future__ import annotations

import numpy as np
import pytest

from hf_dataselect import scoring
from hf_dataselect.errors import InputError
from hf_dataselect.training.scorers import (
    CallableScorer,
    LossScorer,
    PerplexityGapScorer,
    RewardGapScorer,
    check_scores,
    make_scorer,
)

PROMPTS = ["What is 12 plus 30?", "Write a short poem about the sea.", "Sort 5, 3, 9 and 1."]
GOLD = ["The answer is 42.", "Waves roll over the quiet shore.", "1, 3, 5, 9"]


@pytest.fixture(scope="module")
def lm(tiny_llama_path):
    from hf_dataselect.models import load_model, load_tokenizer

    return load_model(str(tiny_llama_path), kind="causal-lm"), load_tokenizer(str(tiny_llama_path))


@pytest.fixture(scope="module")
def chaotic_lm(tiny_llama_path):
    """The tiny Llama with large random weights: unlike the freshly initialised one (which answers every
    prompt with the same token), its greedy answers differ from prompt to prompt."""
    import torch

    from hf_dataselect.models import load_model, load_tokenizer

    model = load_model(str(tiny_llama_path), kind="causal-lm")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model, load_tokenizer(str(tiny_llama_path))


@pytest.fixture(scope="module")
def rm(tiny_reward_model_path):
    from hf_dataselect.models import load_model, load_tokenizer

    path = str(tiny_reward_model_path)
    return load_model(path, kind="sequence-classification"), load_tokenizer(path)


def _naive_nll(model, tokenizer, prompt, response, **encoder_options):
    """One row, no padding: mean of -log p(token) over the response tokens."""
    import torch

    ids, starts = scoring.PairEncoder(tokenizer, **encoder_options).pair_ids([prompt], [response])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[0]])).logits[0].double(), -1)
    return -np.mean([log_probs[t - 1, ids[0][t]].item() for t in range(starts[0], len(ids[0]))])


@pytest.mark.parametrize("chat_template", [True, False])
def test_response_nll_matches_a_naive_loop(lm, chat_template):
    model, tokenizer = lm
    got = scoring.response_nll(model, tokenizer, PROMPTS, GOLD, batch_size=2, chat_template=chat_template)
    expected = [
        _naive_nll(model, tokenizer, p, r, chat_template=chat_template)
        for p, r in zip(PROMPTS, GOLD, strict=True)
    ]
    np.testing.assert_allclose(got.mean_nll, expected, rtol=1e-5)
    np.testing.assert_allclose(got.perplexity, np.exp(expected), rtol=1e-5)
    assert (got.tokens > 0).all()


def test_pair_encoding(lm):
    _, tokenizer = lm
    chat = scoring.PairEncoder(tokenizer)  # the tiny tokenizer has a chat template
    assert chat.chat_template is True
    ids, starts = chat.pair_ids(["Say hi"], ["hi there"])
    assert tokenizer.decode(ids[0][: starts[0]]) == "<|user|>\nSay hi</s>\n<|assistant|>\n"
    assert tokenizer.decode(ids[0][starts[0] :]) == "hi there</s>\n"
    assert chat.prompt_ids(["Say hi"])[0] == ids[0][: starts[0]]

    plain = scoring.PairEncoder(tokenizer, chat_template=False, separator=" => ")
    ids, starts = plain.pair_ids(["Say hi"], ["hi there"])
    assert ids[0][0] == tokenizer.bos_token_id and ids[0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[0][starts[0] :], skip_special_tokens=True).strip() == "hi there"

    alone, starts = plain.pair_ids([""], ["just a text"])  # empty prompt: the text on its own
    assert starts[0] == 1 and tokenizer.decode(alone[0], skip_special_tokens=True) == "just a text"

    short = scoring.PairEncoder(tokenizer, max_length=12)
    ids, starts = short.pair_ids(["word " * 40], ["answer " * 3])
    assert len(ids[0]) == 12 and tokenizer.decode(ids[0][starts[0] :]).startswith("answer")
    with pytest.raises(InputError, match="no chat template"):
        scoring.PairEncoder(type("T", (), {"chat_template": None})(), chat_template=True)


def test_batched_generation_equals_one_prompt_at_a_time(chaotic_lm):
    model, tokenizer = chaotic_lm
    options = {"max_new_tokens": 6, "suppress_tokens": tokenizer.all_special_ids}
    prompts = [*PROMPTS, "hello", "The quick brown fox"]
    batched = scoring.generate_responses(model, tokenizer, prompts, batch_size=5, **options)
    alone = [scoring.generate_responses(model, tokenizer, [p], **options)[0] for p in prompts]
    assert len(set(batched)) == len(prompts)  # distinct answers, so a mix-up of rows would show
    assert batched == alone  # left padding and length-sorted batches change nothing


def test_reward_scores_batched_equal_single(rm):
    model, tokenizer = rm
    batched = scoring.reward_scores(model, tokenizer, PROMPTS, GOLD, batch_size=3)
    single = [
        scoring.reward_scores(model, tokenizer, [p], [r])[0] for p, r in zip(PROMPTS, GOLD, strict=True)
    ]
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    assert batched.dtype == np.float64
    with pytest.raises(InputError, match="label_index"):
        scoring.reward_scores(model, tokenizer, PROMPTS, GOLD, label_index=3)


def test_loss_scorer_is_the_gold_nll(lm):
    model, tokenizer = lm
    columns = LossScorer(batch_size=2)(PROMPTS, GOLD, model=model, tokenizer=tokenizer)
    expected = scoring.response_nll(model, tokenizer, PROMPTS, GOLD).mean_nll
    np.testing.assert_allclose(columns["score"], expected, rtol=1e-6)


def test_perplexity_gap_formula(chaotic_lm):
    model, tokenizer = chaotic_lm
    scorer = PerplexityGapScorer(max_new_tokens=5)
    columns = scorer(PROMPTS, GOLD, model=model, tokenizer=tokenizer)
    generated = scoring.generate_responses(model, tokenizer, PROMPTS, max_new_tokens=5)
    assert all(generated)
    ppl_gold = scoring.response_nll(model, tokenizer, PROMPTS, GOLD).perplexity
    ppl_generated = scoring.response_nll(model, tokenizer, PROMPTS, generated).perplexity
    np.testing.assert_allclose(columns["score"], -np.log(ppl_generated / ppl_gold), rtol=1e-5)


def test_reward_gap_formula(chaotic_lm, rm, tiny_reward_model_path):
    model, tokenizer = chaotic_lm
    scorer = RewardGapScorer(max_new_tokens=5, reward_model=str(tiny_reward_model_path))
    columns = scorer(PROMPTS, GOLD, model=model, tokenizer=tokenizer)
    generated = scoring.generate_responses(model, tokenizer, PROMPTS, max_new_tokens=5)
    reward_model, reward_tokenizer = rm
    gold = scoring.reward_scores(reward_model, reward_tokenizer, PROMPTS, GOLD)
    own = scoring.reward_scores(reward_model, reward_tokenizer, PROMPTS, generated)
    np.testing.assert_allclose(columns["score"], gold - own, rtol=1e-5)
    np.testing.assert_allclose(columns["gold_reward"], gold, rtol=1e-5)


def test_reward_scorer_with_a_missing_model_fails_clearly(lm, tmp_path):
    model, tokenizer = lm
    scorer = RewardGapScorer(max_new_tokens=2, reward_model=str(tmp_path / "nothing-here"))
    with pytest.raises(InputError, match="Could not load the reward model"):
        scorer(PROMPTS[:1], GOLD[:1], model=model, tokenizer=tokenizer)


def test_make_scorer_and_callables():
    assert isinstance(make_scorer("loss", batch_size=2), LossScorer)
    assert make_scorer("perplexity", max_new_tokens=3).max_new_tokens == 3
    with pytest.raises(InputError, match="has no option"):
        make_scorer("loss", max_new_tokens=3)
    with pytest.raises(InputError, match="Unknown scorer"):
        make_scorer("bleu")
    with pytest.raises(InputError, match="only apply to the built-in"):
        make_scorer(lambda p, r: [0.0] * len(p), batch_size=2)

    texts_only = make_scorer(lambda prompts, responses: [len(r) for r in responses])
    assert texts_only(["a"], ["abc"], model=None, tokenizer=None)["score"].tolist() == [3.0]

    seen = {}

    def with_model(prompts, responses, model, tokenizer):
        seen.update(model=model, tokenizer=tokenizer)
        return {"score": [1.0] * len(prompts), "extra": [2.0] * len(prompts)}

    columns = CallableScorer(with_model)(["a"], ["b"], model="M", tokenizer="T")
    assert seen == {"model": "M", "tokenizer": "T"} and columns["extra"].tolist() == [2.0]
    with pytest.raises(InputError, match="sequence of numbers"):
        CallableScorer(lambda p, r: ["x"])(["a"], ["b"], model=None, tokenizer=None)
    with pytest.raises(InputError, match="'score' entry"):
        CallableScorer(lambda p, r: {"value": [1.0]})(["a"], ["b"], model=None, tokenizer=None)


def test_check_scores():
    np.testing.assert_array_equal(check_scores({"score": [1, 2]}, 2), [1.0, 2.0])
    with pytest.raises(InputError, match="3 scores for 2 rows"):
        check_scores({"score": [1, 2, 3]}, 2)
    with pytest.raises(InputError, match="NaN or infinite scores for 1 of 2 rows"):
        check_scores({"score": [1, float("inf")]}, 2)
