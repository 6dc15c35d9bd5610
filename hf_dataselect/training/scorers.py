"""Scorers for iterative kMQ: how much a row still has to teach the model being trained (ALGORITHMS.md §6).

Every scorer maps the rows trained in an epoch to ``S_i``; higher means "the model is further from the gold
answer", and the clusters with high mean ``S`` get more of the next epoch's rows.

==============  ===================================================================  =====================
``reward``      ``R(prompt, gold) − R(prompt, generated)`` with a sequence-            generation + reward
                classification reward model (the paper's best variant)                model
``perplexity``  ``−log(PPL(generated) / PPL(gold))`` = mean NLL(gold) − mean          generation + 2 LM
                NLL(generated), both under the current model                          passes
``loss``        mean NLL of the gold response under the current model                 1 LM pass
callable        ``fn(prompts, responses, model=..., tokenizer=...) -> floats``        yours
==============  ===================================================================  =====================

Generation is greedy by default, so a resumed run scores exactly as an uninterrupted one. A user callable
may accept only ``(prompts, responses)``; ``model`` and ``tokenizer`` are passed when its signature takes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ScoreColumns = dict[str, np.ndarray]
"""``{"score": S_i, ...}`` plus optional per-row details (gold/generated reward or NLL)."""

SCORER_NAMES = ("reward", "perplexity", "loss")


@dataclass
class LossScorer:
    """``S_i`` = mean NLL of the gold response given the prompt (no generation; cheapest)."""

    name = "loss"
    batch_size: int = 8
    max_length: int | None = 1024
    """Longest (prompt + response) in tokens; longer pairs lose the start of the prompt first."""
    chat_template: bool | None = None
    """Format pairs with the tokenizer's chat template (``None``: when it has one)."""
    separator: str = "\n\n"
    """Between prompt and response when no chat template is used."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {self.batch_size}.")

    def lm_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "chat_template": self.chat_template,
            "separator": self.separator,
        }

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> ScoreColumns:
        from hf_dataselect.scoring import response_nll

        gold = response_nll(model, tokenizer, prompts, responses, **self.lm_options())
        return {"score": gold.mean_nll, "gold_nll": gold.mean_nll}


@dataclass
class PerplexityGapScorer(LossScorer):
    """``S_i = −log(PPL(generated) / PPL(gold))``: how much more surprising the gold answer is than the model's own."""

    name = "perplexity"
    max_new_tokens: int = 256
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``model.generate`` arguments (greedy by default: ``do_sample=True`` makes scores random)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}.")

    def generate(self, prompts: Sequence[str], model: Any, tokenizer: Any) -> list[str]:
        from hf_dataselect.scoring import generate_responses

        return generate_responses(
            model,
            tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            **self.lm_options(),
            **self.generation_kwargs,
        )

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> ScoreColumns:
        from hf_dataselect.scoring import response_nll

        generated = self.generate(prompts, model, tokenizer)
        gold = response_nll(model, tokenizer, prompts, responses, **self.lm_options())
        # An empty generation (immediate EOS) is scored as EOS alone, which response_nll does for "".
        own = response_nll(model, tokenizer, prompts, generated, **self.lm_options())
        return {
            "score": gold.mean_nll - own.mean_nll,
            "gold_nll": gold.mean_nll,
            "generated_nll": own.mean_nll,
        }


@dataclass
class RewardGapScorer(PerplexityGapScorer):
    """``S_i = R(prompt, gold) − R(prompt, generated)`` with a sequence-classification reward model."""

    name = "reward"
    reward_model: str | None = None
    """Path or Hub id of an ``AutoModelForSequenceClassification`` reward model (safetensors)."""
    reward_batch_size: int = 8
    label_index: int | None = None
    """Which logit is the reward when the model has several labels."""
    reward_dtype: str = "auto"
    reward_chat_template: bool | None = None
    """Format pairs for the reward model with its chat template (``None``: when its tokenizer has one)."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_model:
            raise InputError(
                "The 'reward' scorer needs reward_model= (a sequence-classification model path or Hub id)."
            )
        self._runtime: tuple[Any, Any] | None = None

    def load(self, device: Any) -> tuple[Any, Any]:
        """The reward model and its tokenizer, loaded once on ``device``."""
        if self._runtime is None:
            from hf_dataselect.models import load_model, load_tokenizer

            try:
                tokenizer = load_tokenizer(self.reward_model, trust_remote_code=self.trust_remote_code)
                model = load_model(
                    self.reward_model,
                    kind="sequence-classification",
                    device=device,
                    dtype=self.reward_dtype,
                    trust_remote_code=self.trust_remote_code,
                )
            except (OSError, ValueError) as err:
                raise InputError(f"Could not load the reward model {self.reward_model!r}: {err}") from err
            self._runtime = (model, tokenizer)
        return self._runtime

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> ScoreColumns:
        from hf_dataselect.scoring import _model_device, reward_scores

        generated = self.generate(prompts, model, tokenizer)
        reward_model, reward_tokenizer = self.load(_model_device(model))
        options = {
            "batch_size": self.reward_batch_size,
            "max_length": self.max_length,
            "chat_template": self.reward_chat_template,
            "separator": self.separator,
            "label_index": self.label_index,
        }
        gold = reward_scores(reward_model, reward_tokenizer, prompts, responses, **options)
        own = reward_scores(reward_model, reward_tokenizer, prompts, generated, **options)
        return {"score": gold - own, "gold_reward": gold, "generated_reward": own}


class CallableScorer:
    """Wraps a user function ``fn(prompts, responses[, model=, tokenizer=]) -> sequence of floats``."""

    name = "callable"

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        try:
            parameters = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # builtins without a signature: pass only the texts
            parameters = {}
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.extra = [name for name in ("model", "tokenizer") if takes_kwargs or name in parameters]

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], *, model: Any, tokenizer: Any
    ) -> ScoreColumns:
        available = {"model": model, "tokenizer": tokenizer}
        out = self.fn(list(prompts), list(responses), **{k: available[k] for k in self.extra})
        if isinstance(out, dict):
            if "score" not in out:
                raise InputError("A scorer returning a dict must include a 'score' entry.")
            return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
        try:
            return {"score": np.asarray(out, dtype=np.float64).reshape(-1)}
        except (TypeError, ValueError) as err:
            raise InputError(
                f"The scorer must return a sequence of numbers, got {type(out).__name__}."
            ) from err

    def __repr__(self) -> str:
        return f"CallableScorer({getattr(self.fn, '__qualname__', self.fn)!r})"


Scorer = LossScorer | CallableScorer

_SCORER_CLASSES: dict[str, type[LossScorer]] = {
    "loss": LossScorer,
    "perplexity": PerplexityGapScorer,
    "reward": RewardGapScorer,
}


def make_scorer(scorer: str | Callable[..., Any], **options: Any) -> Scorer:
    """A scorer from its name (``reward``, ``perplexity``, ``loss``) and options, or from a callable."""
    if callable(scorer) and not isinstance(scorer, str):
        if options:
            raise InputError(
                f"Options {sorted(options)} only apply to the built-in scorers, not to a callable."
            )
        if isinstance(scorer, LossScorer | CallableScorer):
            return scorer
        return CallableScorer(scorer)
    if scorer not in _SCORER_CLASSES:
        raise InputError(f"Unknown scorer {scorer!r}; use one of {list(SCORER_NAMES)} or a callable.")
    cls = _SCORER_CLASSES[scorer]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"The {scorer!r} scorer has no option(s) {unknown}; its options are {sorted(known)}."
        )
    return cls(**options)


def check_scores(columns: ScoreColumns, rows: int) -> np.ndarray:
    """The ``score`` column as float64, after checking its length and that every value is finite."""
    scores = np.asarray(columns["score"], dtype=np.float64)
    if scores.shape != (rows,):
        raise InputError(f"The scorer returned {scores.size} scores for {rows} rows.")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise InputError(
            f"The scorer returned NaN or infinite scores for {len(bad)} of {rows} rows (e.g. row {int(bad[0])}); "
            "iterative kMQ cannot rank clusters with them."
        )
    return scores


def describe_scorer(scorer: Scorer) -> dict[str, Any]:
    """JSON-friendly description for the selection files."""
    if isinstance(scorer, CallableScorer):
        return {"name": "callable", "function": getattr(scorer.fn, "__qualname__", repr(scorer.fn))}
    out: dict[str, Any] = {"name": scorer.name}
    for f in fields(scorer):
        value = getattr(scorer, f.name)
        out[f.name] = (
            value if value is None or isinstance(value, bool | int | float | str | dict) else repr(value)
        )
    return out
