"""``Embeddings``: a fixed-length, L2-normalised sentence embedding per row.

    ds = ds.map(Embeddings(), batched=True)            # offline all-MiniLM-L6-v2, prompt + response
    ds = ds.map(Embeddings("BAAI/bge-small-en-v1.5", text="prompt"), batched=True)

Encoders (BERT-like) are mean-pooled over non-padding tokens, decoder-only models are pooled at the last
non-padding token.

Why it is fast (``benchmarks/results/embeddings.md`` has the numbers):

* **bf16 weights where the hardware computes bf16 natively** (CUDA GPUs with bf16, CPUs with AVX512-BF16 or
  AMX): the whole model runs in bf16 through oneDNN, which is several times faster than fp32 GEMMs on such
  CPUs, while pooling and normalisation stay in fp32 (cosine to fp32 embeddings ≥ 0.999 in the benchmark).
  ``dtype="float32"`` keeps full precision. int8 dynamic quantisation and ``torch.compile`` were measured and
  rejected (cosine 0.93–0.98 to fp32; slower after a 40 s compile).
* **Fused Linear + GELU** (bf16 on CPU, BERT-family encoders): each block's intermediate projection runs
  with its GELU as a oneDNN post-op instead of a separate pass over the widest activation
  (:mod:`hf_dataselect.onednn_fusion`; verified against the module's own forward when the model loads).
* **Token-budget batches**: each ``.map`` batch is tokenized once, sorted by length, and cut into model
  batches of at most ``max_batch_tokens`` padded tokens (and ``batch_size`` rows), so short texts run in
  large batches and long ones in small batches, with almost no padding.
* In ``num_proc`` workers torch runs one thread per worker (unless ``num_threads`` says otherwise), so that
  N workers do not each start one thread per core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import TEXT_PARTS, RowFormat
from hf_dataselect.transforms.base import MapTransform

if TYPE_CHECKING:
    import torch

POOLINGS = ("auto", "mean", "last", "cls")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


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
    batch_size: int = 128
    """Most rows in one forward pass (short texts); see also ``max_batch_tokens``."""
    max_batch_tokens: int = 16384
    """Most padded tokens (rows × longest row) in one forward pass: long texts run in smaller batches."""
    max_length: int | None = None
    """Truncation length in tokens; ``None``: the sentence-transformers setting if present, else ≤ 512."""
    column: str = "embedding"
    device: str | None = None
    """``None``: the first CUDA GPU, else Apple MPS, else CPU."""
    dtype: str = "auto"
    """``"auto"``: bf16 where computed natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 on other
    GPUs, else fp32; or ``"float32"``, ``"bfloat16"``, ``"float16"``. Pooling is always done in fp32."""
    num_threads: int | None = None
    """torch CPU threads; ``None``: unchanged in the main process, one per ``datasets.map(num_proc=...)`` worker."""
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
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        for name in ("batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise InputError(f"max_length must be an integer ≥ 2 or None, got {self.max_length!r}.")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise InputError(f"num_threads must be a positive integer or None, got {self.num_threads!r}.")

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        row_format = RowFormat.resolve(
            batch.keys(),
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
        )
        texts = row_format.batch_text(batch, part=self.text)
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise InputError(
                f"{len(empty)} row(s) of this batch have no {self.text.replace('_', ' + ')} text to embed "
                f"(positions in the batch: {empty[:5]}). Drop them first (dataset.filter) or choose "
                "another text=/formatting columns."
            )
        return {self.column: self.encode(texts)}

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a ``[len(texts), dim]`` float32 array (rows in input order)."""
        return self.runtime().encode(texts)

    def _build_runtime(self) -> _Encoder:
        from hf_dataselect.distributed import configure_torch_threads

        configure_torch_threads(self.num_threads)
        return _Encoder(self)


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int) -> Iterator[np.ndarray]:
    """Positions of ``lengths`` grouped into model batches, longest first.

    Rows are sorted by length (descending, stable); each batch takes as many of the next rows as fit in
    ``max_batch_tokens`` padded tokens (its first row is its longest) and at most ``batch_size`` rows.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        yield order[start : start + rows]
        start += rows


class _Encoder:
    """A loaded model + tokenizer, and the pooling rule for it."""

    def __init__(self, config: Embeddings) -> None:
        from hf_dataselect import models
        from hf_dataselect.onednn_fusion import fuse_linear_gelu

        self.device = models.resolve_device(config.device)
        self.dtype = (
            models.fast_inference_dtype(self.device)
            if config.dtype == "auto"
            else models.resolve_dtype(config.dtype, self.device)
        )
        self.tokenizer = models.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = models.load_model(
            config.model, device=self.device, dtype=self.dtype, trust_remote_code=config.trust_remote_code
        )
        fuse_linear_gelu(self.model)
        self.pooling = config.pooling
        if self.pooling == "auto":
            self.pooling = "last" if models.is_decoder_only(self.model.config) else "mean"
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad_id)
        model_max = getattr(self.model.config, "max_position_embeddings", 512) or 512
        self.max_length = (
            config.max_length or models.sentence_transformers_max_length(config.model) or min(512, model_max)
        )
        self.normalize = config.normalize
        self.batch_size = config.batch_size
        self.max_batch_tokens = config.max_batch_tokens

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = self.tokenize(texts)
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for chosen in plan_batches(lengths, self.batch_size, self.max_batch_tokens):
                input_ids, mask = self._pad([token_ids[i] for i in chosen])
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                out[chosen] = self._pool(hidden, mask).cpu().numpy()
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` (right padding keeps the last token findable)."""
        import torch

        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        hidden = hidden.float()
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # last non-padding token (right padding)
            last = mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
