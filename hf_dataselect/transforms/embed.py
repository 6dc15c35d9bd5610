"""``Embeddings``: a fixed-length, L2-normalised sentence embedding per row.

    ds = ds.map(Embeddings(), batched=True)            # offline all-MiniLM-L6-v2, prompt + response
    ds = ds.map(Embeddings("BAAI/bge-small-en-v1.5", text="prompt"), batched=True)

Encoders (BERT-like) are mean-pooled over non-padding tokens, decoder-only models are pooled at the last
non-padding token. Each batch is sorted by token length before it is cut into model batches, so little compute
is spent on padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import TEXT_PARTS, RowFormat
from hf_dataselect.transforms.base import MapTransform

if TYPE_CHECKING:
    import torch

POOLINGS = ("auto", "mean", "last", "cls")


@dataclass
class Embeddings(MapTransform):
    """Adds a float32 ``embedding`` column (L2-normalised) computed by a Hugging Face encoder."""

    model: str | None = None
    """Path or Hub id of any ``AutoModel``; ``None`` = the offline all-MiniLM-L6-v2."""
    text: str = "prompt_response"
    """Which text to embed: ``"prompt_response"`` (kMQ's default), ``"prompt"`` or ``"response"``."""
    pooling: str = "auto"
    """``"mean"``, ``"last"`` (last non-padding token), ``"cls"``; ``"auto"``: last for decoders, else mean."""
    normalize: bool = True
    batch_size: int = 64
    max_length: int | None = None
    """Truncation length in tokens; ``None``: the sentence-transformers setting if present, else ≤ 512."""
    column: str = "embedding"
    device: str | None = None
    dtype: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    formatter: Callable[..., tuple[str, str]] | None = None
    """Optional ``formatter(row) -> (prompt, response)`` instead of format detection."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.text not in TEXT_PARTS:
            raise InputError(f"text must be one of {list(TEXT_PARTS)}, got {self.text!r}.")
        if self.pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {self.batch_size}.")

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        row_format = RowFormat.resolve(
            batch.keys(),
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
        )
        texts = row_format.batch_text(batch, part=self.text)
        return {self.column: self.encode(texts)}

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a ``[len(texts), dim]`` float32 array (rows in input order)."""
        return self.runtime().encode(texts, self.batch_size)

    def _build_runtime(self) -> _Encoder:
        return _Encoder(self)


class _Encoder:
    """A loaded model + tokenizer, and the pooling rule for it."""

    def __init__(self, config: Embeddings) -> None:
        from hf_dataselect import models

        self.device = models.resolve_device(config.device)
        self.tokenizer = models.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = models.load_model(
            config.model, device=self.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code
        )
        self.pooling = config.pooling
        if self.pooling == "auto":
            self.pooling = "last" if models.is_decoder_only(self.model.config) else "mean"
        if self.pooling == "last":
            self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model_max = getattr(self.model.config, "max_position_embeddings", 512) or 512
        self.max_length = (
            config.max_length or models.sentence_transformers_max_length(config.model) or min(512, model_max)
        )
        self.normalize = config.normalize

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chosen = order[start : start + batch_size]
                features = self.tokenizer.pad(
                    {"input_ids": [encoded["input_ids"][i] for i in chosen]}, return_tensors="pt"
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                hidden = self.model(**features).last_hidden_state
                out[chosen] = self._pool(hidden, features["attention_mask"]).float().cpu().numpy()
        return out

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # last non-padding token (right padding)
            last = mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        pooled = pooled.float()
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
