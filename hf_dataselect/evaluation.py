"""Held-out evaluation of a fine-tuned causal LM: response loss per label, macro-averaged over labels.

A selection method is judged by the model trained on its subset. The cheapest honest signal is the loss of
held-out gold responses, but a single token-weighted loss over a mixed evaluation set is dominated by the
labels (tasks, templates, sources) with long responses, and so ranks methods by how well they fit a few long
tasks. :func:`heldout_loss` therefore reports the loss **per label** (token-weighted inside a label: the log
perplexity of that label's responses) and their **macro average**, next to the token-weighted overall loss.

:class:`HeldOutLossCallback` runs the same evaluation at the end of chosen epochs of a ``transformers.Trainer``
/ ``trl.SFTTrainer`` run, so one training run shows how the comparison between subsets evolves with training
length; results go to the trainer's log history and to a JSON-lines file.

Prompts and responses are tokenized by :class:`hf_dataselect.scoring.PairEncoder` (chat template when the
tokenizer has one, else ``prompt + "\\n\\n" + response + EOS``) — the same convention
:func:`hf_dataselect.recipes.sft_examples` uses to build the training data, so training and evaluation agree
on which tokens are the response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ALL_ROWS_LABEL = "all"


@dataclass
class EvalSet:
    """Held-out ``(prompt, response)`` pairs with an optional label per pair (template, task, source)."""

    prompts: list[str]
    responses: list[str]
    labels: list[str] | None = None
    name: str = "heldout"

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise InputError(
                f"Evaluation set {self.name!r}: {len(self.prompts)} prompts but {len(self.responses)} responses."
            )
        if not self.prompts:
            raise InputError(f"Evaluation set {self.name!r} is empty.")
        if self.labels is not None and len(self.labels) != len(self.prompts):
            raise InputError(
                f"Evaluation set {self.name!r}: {len(self.labels)} labels for {len(self.prompts)} rows."
            )
        empty = [i for i, r in enumerate(self.responses) if not r.strip()]
        if empty:
            raise InputError(
                f"Evaluation set {self.name!r}: {len(empty)} row(s) have no response to score, e.g. row "
                f"position(s) {empty[:5]}."
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        *,
        label_column: str | None = None,
        name: str = "heldout",
        prompt_column: str | None = None,
        response_column: str | None = None,
    ) -> EvalSet:
        """Pairs from any instruction format :class:`~hf_dataselect.formatting.RowFormat` reads."""
        from hf_dataselect.data import pool_prompt_response, require_columns
        from hf_dataselect.formatting import RowFormat

        row_format = RowFormat.resolve(
            dataset.column_names, prompt_column=prompt_column, response_column=response_column
        )
        if not row_format.has_response:
            raise InputError(
                f"Evaluation set {name!r}: rows have no separate response (format {row_format.kind!r}); "
                "held-out loss needs a prompt and a gold response."
            )
        labels = None
        if label_column is not None:
            require_columns(dataset, [label_column], purpose=f"Evaluation set {name!r}")
            labels = [str(v) for v in dataset[label_column]]
        prompts, responses = pool_prompt_response(dataset, row_format)
        return cls(prompts=prompts, responses=responses, labels=labels, name=name)


@dataclass
class HeldOutLoss:
    """Response loss (mean NLL per token, nats) on one evaluation set, per label and aggregated."""

    labels: list[str]
    loss: np.ndarray
    """Token-weighted mean NLL of each label's responses (aligned with ``labels``)."""
    tokens: np.ndarray
    """Response tokens scored per label."""
    rows: np.ndarray
    """Rows per label."""
    row_loss: np.ndarray = field(repr=False)
    """Mean NLL per row, in the evaluation set's order."""

    @property
    def macro(self) -> float:
        """Unweighted mean of the per-label losses: every label counts the same."""
        return float(np.mean(self.loss))

    @property
    def overall(self) -> float:
        """Token-weighted mean over all rows (dominated by labels with long responses)."""
        return float(np.sum(self.loss * self.tokens) / np.sum(self.tokens))

    def to_dict(self) -> dict[str, Any]:
        return {
            "macro_loss": self.macro,
            "overall_loss": self.overall,
            "labels": len(self.labels),
            "rows": int(self.rows.sum()),
            "tokens": int(self.tokens.sum()),
            "per_label": {
                label: {"loss": float(loss), "tokens": int(tokens), "rows": int(rows)}
                for label, loss, tokens, rows in zip(
                    self.labels, self.loss, self.tokens, self.rows, strict=True
                )
            },
        }


def group_losses(row_loss: np.ndarray, row_tokens: np.ndarray, labels: Sequence[str] | None) -> HeldOutLoss:
    """Aggregate per-row mean NLLs into token-weighted per-label losses (labels sorted by name)."""
    row_loss = np.asarray(row_loss, dtype=np.float64)
    row_tokens = np.asarray(row_tokens, dtype=np.int64)
    names = [ALL_ROWS_LABEL] * len(row_loss) if labels is None else [str(label) for label in labels]
    unique, inverse = np.unique(np.asarray(names, dtype=object), return_inverse=True)
    token_sums = np.bincount(inverse, weights=row_tokens, minlength=len(unique))
    nll_sums = np.bincount(inverse, weights=row_loss * row_tokens, minlength=len(unique))
    rows = np.bincount(inverse, minlength=len(unique))
    return HeldOutLoss(
        labels=[str(u) for u in unique],
        loss=nll_sums / token_sums,
        tokens=token_sums.astype(np.int64),
        rows=rows.astype(np.int64),
        row_loss=row_loss,
    )


def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    *,
    batch_size: int = 16,
    max_length: int | None = 1024,
    chat_template: bool | None = None,
) -> HeldOutLoss:
    """Loss of the gold responses of ``eval_set`` under ``model``, per label and macro-averaged.

    ``chat_template``: tokenize pairs as a user and an assistant turn (``None``: when the tokenizer has a chat
    template), as :func:`hf_dataselect.recipes.sft_examples` does for training.
    """
    from hf_dataselect.scoring import response_nll

    scored = response_nll(
        model,
        tokenizer,
        eval_set.prompts,
        eval_set.responses,
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
    )
    result = group_losses(scored.mean_nll, scored.tokens, eval_set.labels)
    if not np.isfinite(result.loss).all():
        raise FloatingPointError(f"Held-out loss on {eval_set.name!r} is not finite (the model diverged).")
    return result


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class HeldOutLossCallback(_callback_base()):  # type: ignore[misc]
    """Evaluate :func:`heldout_loss` on named evaluation sets at the end of chosen epochs.

    Args:
        eval_sets: the sets to evaluate (their ``name`` prefixes the logged keys:
            ``<name>_macro_loss``, ``<name>_overall_loss``).
        tokenizer: the tokenizer the model trains with.
        epochs: epochs (1-based) after which to evaluate; ``None``: after every epoch.
        log_file: JSON-lines file that receives one record per evaluation, including per-label losses.
        batch_size / max_length / chat_template: as in :func:`heldout_loss`.

    Only the main process evaluates and writes (the others wait for it); records also go to the trainer's
    log history, so they end up in ``trainer_state.json``.
    """

    def __init__(
        self,
        eval_sets: Sequence[EvalSet],
        tokenizer: PreTrainedTokenizerBase,
        *,
        epochs: Sequence[int] | None = None,
        log_file: str | Path | None = None,
        batch_size: int = 16,
        max_length: int | None = 1024,
        chat_template: bool | None = None,
    ) -> None:
        names = [s.name for s in eval_sets]
        if len(set(names)) != len(names):
            raise InputError(f"Evaluation sets need distinct names, got {names}.")
        if epochs is not None and any(int(e) < 1 for e in epochs):
            raise InputError(f"Evaluation epochs are counted from 1, got {list(epochs)}.")
        self.eval_sets = list(eval_sets)
        self.tokenizer = tokenizer
        self.epochs = None if epochs is None else sorted({int(e) for e in epochs})
        self.log_file = Path(log_file) if log_file is not None else None
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.records: list[dict[str, Any]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        if self.epochs is not None and epoch not in self.epochs:
            return control
        if state.is_world_process_zero:
            record: dict[str, Any] = {"epoch": epoch, "step": int(state.global_step)}
            metrics: dict[str, float] = {}
            for eval_set in self.eval_sets:
                result = heldout_loss(
                    model,
                    self.tokenizer,
                    eval_set,
                    batch_size=self.batch_size,
                    max_length=self.max_length,
                    chat_template=self.chat_template,
                )
                record[eval_set.name] = result.to_dict()
                metrics[f"{eval_set.name}_macro_loss"] = result.macro
                metrics[f"{eval_set.name}_overall_loss"] = result.overall
                logger.info(
                    "epoch %d: %s macro loss %.4f (overall %.4f, %d labels)",
                    epoch,
                    eval_set.name,
                    result.macro,
                    result.overall,
                    len(result.labels),
                )
            self.records.append(record)
            state.log_history.append({**metrics, "epoch": float(epoch), "step": int(state.global_step)})
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                with self.log_file.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
        _wait_for_everyone(args)
        return control


def _wait_for_everyone(args: Any) -> None:
    import torch.distributed as dist

    if getattr(args, "world_size", 1) > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
