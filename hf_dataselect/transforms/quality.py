"""Per-row quality columns computed by a model: reward-model scores and response perplexity.

    ds = ds.map(RewardScores("OpenAssistant/reward-model-deberta-v3-large-v2"), batched=True)  # adds `quality`
    ds = ds.map(PerplexityScores("Qwen/Qwen2.5-0.5B"), batched=True)                           # adds `perplexity`

``quality`` feeds kMQ's in-cluster sampling (``quality_column="quality"``); ``perplexity`` feeds the
``perplexity`` baseline. Like every :class:`~hf_dataselect.transforms.base.MapTransform`, a transform pickles
only its configuration and loads its model lazily, so a second identical ``.map`` is a cache hit.

A pair is formatted with the model tokenizer's chat template when it has one (a user turn with the prompt, an
assistant turn with the response), else as ``prompt + "\\n\\n" + response``; see :mod:`hf_dataselect.scoring`.
Rows without a separate response (a ``text`` column) are scored as a whole text by ``PerplexityScores`` and
rejected by ``RewardScores``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import RowFormat
from hf_dataselect.transforms.base import MapTransform


@dataclass
class _PairTransform(MapTransform):
    """Shared configuration: the model, batching, and how rows become (prompt, response)."""

    model: str | None = None
    column: str = ""
    batch_size: int = 8
    max_length: int | None = 1024
    """Longest (prompt + response) in tokens; longer pairs lose the start of the prompt first."""
    chat_template: bool | None = None
    """Use the tokenizer's chat template (``None``: when it has one)."""
    device: str | None = None
    dtype: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    formatter: Callable[..., tuple[str, str]] | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise InputError(f"{type(self).__name__} needs model= (a path or Hub id).")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {self.batch_size}.")
        if not self.column:
            raise InputError("column must be a non-empty column name.")

    def pairs(self, batch: dict[str, list[Any]]) -> tuple[list[str], list[str], RowFormat]:
        row_format = RowFormat.resolve(
            batch.keys(),
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
        )
        prompts, responses = row_format.batch_prompt_response(batch)
        return prompts, responses, row_format

    def _load(self, kind: str) -> tuple[Any, Any]:
        from hf_dataselect import models

        device = models.resolve_device(self.device)
        tokenizer = models.load_tokenizer(self.model, trust_remote_code=self.trust_remote_code)
        model = models.load_model(
            self.model, kind=kind, device=device, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        )
        return model, tokenizer


@dataclass
class RewardScores(_PairTransform):
    """Adds a float ``quality`` column: a sequence-classification reward model's score of (prompt, response)."""

    column: str = "quality"
    label_index: int | None = None
    """Which logit is the reward when the model has several labels."""

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        from hf_dataselect.scoring import reward_scores

        prompts, responses, _ = self.pairs(batch)
        missing = [i for i, r in enumerate(responses) if not r.strip()]
        if missing:
            raise InputError(
                f"RewardScores needs a response in every row; {len(missing)} row(s) of this batch have none "
                f"(e.g. batch position {missing[0]})."
            )
        model, tokenizer = self.runtime()
        rewards = reward_scores(
            model,
            tokenizer,
            prompts,
            responses,
            batch_size=self.batch_size,
            max_length=self.max_length,
            chat_template=self.chat_template,
            label_index=self.label_index,
        )
        return {self.column: rewards.astype(np.float32)}

    def _build_runtime(self) -> tuple[Any, Any]:
        return self._load("sequence-classification")


@dataclass
class PerplexityScores(_PairTransform):
    """Adds a float ``perplexity`` column: ``exp`` of the response's mean token NLL given the prompt."""

    column: str = "perplexity"

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        from hf_dataselect.scoring import response_nll

        prompts, responses, _ = self.pairs(batch)
        # rows without a response: the whole text is what is measured
        texts = [(p, r) if r.strip() else ("", p) for p, r in zip(prompts, responses, strict=True)]
        empty = [i for i, (_, r) in enumerate(texts) if not r.strip()]
        if empty:
            raise InputError(f"{len(empty)} row(s) have no text to measure (e.g. batch position {empty[0]}).")
        model, tokenizer = self.runtime()
        nll = response_nll(
            model,
            tokenizer,
            [p for p, _ in texts],
            [r for _, r in texts],
            batch_size=self.batch_size,
            max_length=self.max_length,
            chat_template=self.chat_template,
        )
        return {self.column: nll.perplexity.astype(np.float32)}

    def _build_runtime(self) -> tuple[Any, Any]:
        return self._load("causal-lm")
