"""Language-model primitives shared by quality transforms, the perplexity baseline and iterative-kMQ scorers.

* :func:`response_nll` — mean negative log-likelihood of each gold response given its prompt (its ``exp`` is
  the response perplexity);
* :func:`generate_responses` — batched greedy (or sampled) answers to prompts;
* :func:`reward_scores` — a sequence-classification reward model's score of (prompt, response) pairs.

How a (prompt, response) pair becomes tokens is decided once, by :class:`PairEncoder`: with the tokenizer's
chat template when it has one (a user turn, then an assistant turn; the response is what the full
conversation adds after the generation prompt, as TRL's SFTTrainer computes its completion mask), otherwise as
plain text ``prompt + separator + response`` followed by EOS. Work is batched by length (sorted, so little is
spent on padding) and every function returns values in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PairEncoder:
    """Turns prompts and (prompt, response) pairs into token ids the way the model was trained on them."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: bool | None = None
    """Use the tokenizer's chat template; ``None``: when the tokenizer has one."""
    separator: str = "\n\n"
    """Between prompt and response in plain-text mode."""
    max_length: int | None = 1024
    """Longest sequence fed to the model; longer ones lose the start of the prompt, then the end of the response."""

    def __post_init__(self) -> None:
        if self.chat_template is None:
            self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        elif self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise InputError("chat_template=True but the tokenizer has no chat template.")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length must be at least 2 tokens, got {self.max_length}.")

    # -- prompts (for generation) -------------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids after which the model writes its answer (chat: including the generation prompt)."""
        if self.chat_template:
            texts = self.tokenizer.apply_chat_template(
                [[{"role": "user", "content": p}] for p in prompts],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer([p + self.separator for p in prompts])["input_ids"]
        if self.max_length is not None:
            ids = [row[-self.max_length :] for row in ids]
        return ids

    # -- pairs (for likelihoods and rewards) ----------------------------------------------------------------
    def pair_ids(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each (prompt, response) and the index where the response tokens start.

        An empty prompt means "score the response as a text on its own" (no chat turn, no separator).
        """
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        eos = self.tokenizer.eos_token_id
        with_prompt = [i for i, p in enumerate(prompts) if p]
        without_prompt = [i for i, p in enumerate(prompts) if not p]
        full: list[list[int]] = [[] for _ in prompts]
        starts = [0] * len(prompts)
        if with_prompt:
            chosen_p = [prompts[i] for i in with_prompt]
            chosen_r = [responses[i] for i in with_prompt]
            if self.chat_template:
                prompt_texts = self.tokenizer.apply_chat_template(
                    [[{"role": "user", "content": p}] for p in chosen_p],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                full_texts = self.tokenizer.apply_chat_template(
                    [
                        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                        for p, r in zip(chosen_p, chosen_r, strict=True)
                    ],
                    tokenize=False,
                )
                prompt_ids = self.tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
                full_ids = self.tokenizer(list(full_texts), add_special_tokens=False)["input_ids"]
            else:
                prompt_ids = self.tokenizer([p + self.separator for p in chosen_p])["input_ids"]
                full_ids = self.tokenizer(
                    [p + self.separator + r for p, r in zip(chosen_p, chosen_r, strict=True)]
                )["input_ids"]
                full_ids = [_with_eos(ids, eos) for ids in full_ids]
            for i, p_ids, f_ids in zip(with_prompt, prompt_ids, full_ids, strict=True):
                full[i], starts[i] = f_ids, common_prefix_length(p_ids, f_ids)
        if without_prompt:
            alone = self.tokenizer([responses[i] for i in without_prompt])["input_ids"]
            for i, ids in zip(without_prompt, alone, strict=True):
                ids = _with_eos(ids, eos)
                # the first token (BOS, or the first word) is context, not something the model predicts
                full[i], starts[i] = ids, 1 if len(ids) > 1 else 0
        if self.max_length is not None:
            for i in range(len(full)):
                full[i], starts[i] = _truncate_pair(full[i], starts[i], self.max_length)
        return full, starts


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share (the prompt part of a tokenized prompt + response)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None or (ids and ids[-1] == eos):
        return list(ids)
    return [*ids, eos]


def _truncate_pair(ids: list[int], start: int, max_length: int) -> tuple[list[int], int]:
    """Keep at most ``max_length`` tokens: drop the start of the prompt first, then the end of the response."""
    if len(ids) <= max_length:
        return ids, start
    prompt, response = ids[:start], ids[start:]
    keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt :]
    response = response[: max_length - len(prompt)]
    return prompt + response, len(prompt)


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length, longest first (the first batch shows memory problems early)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}.")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _model_device(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _padded(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool, device: Any):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


@dataclass
class ResponseNLL:
    """Per-row likelihood of the response given the prompt."""

    mean_nll: np.ndarray
    """Mean negative log-likelihood per response token (nats); ``log`` of the response perplexity."""
    tokens: np.ndarray
    """Number of response tokens scored."""

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.mean_nll)


def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = 1024,
    chat_template: bool | None = None,
    separator: str = "\n\n",
) -> ResponseNLL:
    """Mean token NLL of each response given its prompt under the causal LM ``model`` (eval mode, no grad)."""
    import torch

    encoder = PairEncoder(tokenizer, chat_template=chat_template, separator=separator, max_length=max_length)
    full, starts = encoder.pair_ids(prompts, responses)
    empty = [i for i, (ids, s) in enumerate(zip(full, starts, strict=True)) if len(ids) - s < 1]
    if empty:
        raise InputError(f"{len(empty)} response(s) have no tokens to score, e.g. rows {empty[:5]}.")
    mean_nll = np.empty(len(full), dtype=np.float64)
    tokens = np.array([len(ids) - s for ids, s in zip(full, starts, strict=True)], dtype=np.int64)
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    with _eval_mode(model), torch.inference_mode():
        for batch in _batches_by_length([len(r) for r in full], batch_size):
            ids, mask = _padded([full[i] for i in batch], pad_id, left=False, device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = ids[:, 1:]
            positions = torch.arange(ids.shape[1] - 1, device=device)[None, :]
            starts_t = torch.tensor([starts[i] for i in batch], device=device)[:, None]
            lengths_t = mask.sum(1)[:, None]
            # token t+1 is predicted at position t; response tokens are [start, length)
            scored = (positions + 1 >= starts_t) & (positions + 1 < lengths_t)
            rows = torch.nonzero(scored, as_tuple=True)[0]
            nll = torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
                0, rows, nll.double()
            )
            counts = scored.sum(1).double()
            mean_nll[batch] = (sums / counts).cpu().numpy()
    return ResponseNLL(mean_nll=mean_nll, tokens=tokens)


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_length: int | None = 1024,
    chat_template: bool | None = None,
    separator: str = "\n\n",
    **generation_kwargs: Any,
) -> list[str]:
    """The model's answer to each prompt (greedy unless ``do_sample=True`` is passed), in input order."""
    import torch

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}.")
    encoder = PairEncoder(tokenizer, chat_template=chat_template, separator=separator, max_length=max_length)
    prompt_ids = encoder.prompt_ids(prompts)
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    # use_cache: training set-ups often switch the KV cache off (gradient checkpointing); generation needs it
    kwargs: dict[str, Any] = {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if getattr(model.generation_config, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    kwargs.update(generation_kwargs)
    if not kwargs["do_sample"]:  # silence "temperature is set but do_sample=False" style warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    answers: list[str] = [""] * len(prompts)
    with _eval_mode(model), torch.inference_mode():
        for batch in _batches_by_length([len(r) for r in prompt_ids], batch_size):
            ids, mask = _padded([prompt_ids[i] for i in batch], pad_id, left=True, device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                answers[i] = text.strip()
    return answers


def reward_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = 1024,
    chat_template: bool | None = None,
    separator: str = "\n\n",
    label_index: int | None = None,
) -> np.ndarray:
    """Reward of each (prompt, response) under a sequence-classification model (float64, input order).

    The reward is the model's single logit; for a model with several labels name the one to use with
    ``label_index``.
    """
    import torch

    num_labels = int(getattr(model.config, "num_labels", 1))
    if label_index is None and num_labels != 1:
        raise InputError(
            f"The reward model has {num_labels} labels; pass label_index= to say which logit is the reward."
        )
    index = 0 if label_index is None else int(label_index)
    if not -num_labels <= index < num_labels:
        raise InputError(f"label_index {label_index} is out of range for a model with {num_labels} labels.")
    pad_id = _pad_id(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # the classifier reads the last non-padding token
    encoder = PairEncoder(tokenizer, chat_template=chat_template, separator=separator, max_length=max_length)
    full, _ = encoder.pair_ids(prompts, responses)
    out = np.empty(len(full), dtype=np.float64)
    device = _model_device(model)
    with _eval_mode(model), torch.inference_mode():
        for batch in _batches_by_length([len(r) for r in full], batch_size):
            ids, mask = _padded([full[i] for i in batch], pad_id, left=False, device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            out[batch] = logits[:, index].float().cpu().numpy()
    return out


class _eval_mode:
    """Put a model in eval mode for a block and restore its previous mode afterwards."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training:
            self.model.train()
