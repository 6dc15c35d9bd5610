"""``SAEFeatures``: the sparse set of SAE latents each row activates (ALGORITHMS.md, section 2).

    ds = add_sae_features(ds)                                    # MiniLM + an SAE trained on this pool
    ds = ds.map(SAEFeatures(model="meta-llama/Llama-3.1-8B-Instruct", sae="EleutherAI/sae-llama-3.1-8b-64x",
                            hookpoint="layers.23"), batched=True)

For every row: run the model on the row's text, take the hidden states at the SAE's hookpoint, drop special
tokens and padding, TopK-encode every token, max-pool each latent over the tokens, and keep the latents whose
pooled activation is above the threshold τ. Columns added:

* ``sae_indices`` — list of int32, the active latents in ascending order;
* ``sae_values`` — list of float32, their max-pooled activations (aligned with ``sae_indices``);
* ``sae_n_active`` — int32, how many latents are active.

The threshold τ is

* ``threshold=τ``: absolute, in the SAE's activation units (the paper uses 10 for its Llama SAE);
* ``threshold_quantile=q``: the q-quantile of the non-zero token activations (the values of every token's
  TopK code) of this SAE on the pool. A quantile per ``.map`` batch would make τ depend on batching, so it is
  calibrated once, on a seeded sample of ``calibration_rows`` rows, by :meth:`SAEFeatures.for_pool` (cached
  under the cache dir) and stored in ``calibrated_threshold`` — part of the configuration, hence of the
  ``datasets`` fingerprint and of a selection's manifest;
* neither: τ = 0, every latent that enters some token's TopK code counts.

``sae="auto"`` (the default) means an SAE trained on the pool itself. A ``.map`` callable only sees one batch,
so resolve it first with :meth:`SAEFeatures.for_pool` (or :func:`add_sae_features`, which also maps); calling
an unresolved transform raises :class:`~hf_dataselect.errors.InputError`.

Like every :class:`~hf_dataselect.transforms.base.MapTransform`, only the configuration is pickled, models load
lazily in each process, and a second identical ``.map`` is a cache hit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import TEXT_PARTS, RowFormat
from hf_dataselect.transforms.base import MapTransform

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from hf_dataselect.sae.activations import TokenActivations
    from hf_dataselect.sae.auto import AutoSAEConfig

logger = logging.getLogger(__name__)

AUTO = "auto"
COLUMNS = ("sae_indices", "sae_values", "sae_n_active")


@dataclass
class SAEFeatures(MapTransform):
    """Adds ``sae_indices`` (int32), ``sae_values`` (float32) and ``sae_n_active`` (int32) per row."""

    model: str | None = None
    """Path or Hub id of the model whose hidden states the SAE reads; ``None`` = the offline all-MiniLM-L6-v2."""
    sae: str = AUTO
    """SAE folder or Hub repo (ours, sparsify or SAELens), or ``"auto"`` (trained on the pool; see ``for_pool``)."""
    hookpoint: str | int | None = None
    """Module path (``"layers.12"``) or layer index; ``None``: the SAE's recorded hookpoint, else the last block."""
    threshold: float | None = None
    """Absolute activation threshold τ (a latent is active when its max over tokens is > τ)."""
    threshold_quantile: float | None = None
    """τ = this quantile of the SAE's non-zero token activations on the pool (calibrated by ``for_pool``)."""
    batch_size: int = 32
    """Texts per model forward pass."""
    max_length: int | None = None
    """Truncation length in tokens; ``None``: the model's context, at most 2048."""
    device: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    text: str = "prompt_response"
    """Which text is encoded: ``"prompt_response"``, ``"prompt"`` or ``"response"``."""
    formatter: Callable[..., tuple[str, str]] | None = None
    """Optional ``formatter(row) -> (prompt, response)`` instead of format detection."""
    dtype: str = "auto"
    """dtype of the model forward. ``"auto"``: as :class:`~hf_dataselect.transforms.embed.Embeddings`, bf16 on
    CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA GPUs that support it, fp16 on other GPUs, else fp32 —
    on such CPUs 1.3–1.9x the rows/s of fp32, with active latent sets at Jaccard ≈ 0.98 to the fp32 ones
    (benchmarks/results/sae.md); ``"float32"`` gives the same features on every CPU. The SAE itself runs in
    its own dtype (float32 unless saved otherwise) on the hidden states cast to it."""
    trust_remote_code: bool = False
    calibrated_threshold: float | None = None
    """τ resolved from ``threshold_quantile`` on the pool (set by :meth:`for_pool`)."""
    calibration_rows: int = 512
    """Rows (a seeded sample of the pool) used to calibrate ``threshold_quantile``."""
    sae_sha256: str | None = None
    """sha256 of the SAE weights (set by :meth:`for_pool`) so that a changed file changes the cache key."""
    seed: int = 0
    """Seed of the calibration sample (and of the pool-trained SAE)."""

    def __post_init__(self) -> None:
        if self.text not in TEXT_PARTS:
            raise InputError(f"text must be one of {list(TEXT_PARTS)}, got {self.text!r}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {self.batch_size}.")
        if not isinstance(self.sae, str) or not self.sae:
            raise InputError(f"sae must be a folder, a Hub repo id or 'auto', got {self.sae!r}.")
        if self.threshold is not None and self.threshold_quantile is not None:
            raise InputError("Give threshold (absolute) or threshold_quantile, not both.")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise InputError(f"threshold must be a finite number ≥ 0, got {self.threshold}.")
        if self.threshold_quantile is not None and not 0 < self.threshold_quantile < 1:
            raise InputError(f"threshold_quantile must be in (0, 1), got {self.threshold_quantile}.")
        if self.max_length is not None and self.max_length < 1:
            raise InputError(f"max_length must be ≥ 1, got {self.max_length}.")
        if self.calibration_rows < 1:
            raise InputError(f"calibration_rows must be ≥ 1, got {self.calibration_rows}.")

    # -- resolution against the pool -----------------------------------------------------------------------
    @classmethod
    def for_pool(
        cls,
        dataset: Dataset,
        *,
        cache_dir: str | os.PathLike | None = None,
        auto_sae: AutoSAEConfig | dict[str, Any] | None = None,
        progress: bool = True,
        **options: Any,
    ) -> SAEFeatures:
        """A transform ready to map over ``dataset``: ``sae="auto"`` trained (or reused from ``cache_dir``) on
        this pool, ``threshold_quantile`` calibrated on it, and the SAE's weights fingerprinted.

        ``options`` are the fields of :class:`SAEFeatures`; ``auto_sae`` the options of the pool-trained SAE
        (:class:`~hf_dataselect.sae.auto.AutoSAEConfig`).
        """
        return cls(**options).resolve(dataset, cache_dir=cache_dir, auto_sae=auto_sae, progress=progress)

    def resolve(
        self,
        dataset: Dataset,
        *,
        cache_dir: str | os.PathLike | None = None,
        auto_sae: AutoSAEConfig | dict[str, Any] | None = None,
        progress: bool = True,
    ) -> SAEFeatures:
        """This transform with every pool-dependent setting fixed (see :meth:`for_pool`)."""
        from hf_dataselect.sae import auto

        resolved = self
        texts: list[str] | None = None
        if self.sae == AUTO:
            texts = self.pool_texts(dataset)
            folder, hookpoint = auto.pool_sae(
                texts,
                model=self.model,
                hookpoint=self.hookpoint,
                max_length=self.max_length,
                device=self.device,
                # train on activations of the dtype the features will be read in (bf16 on some CPUs)
                dtype=str(self.model_dtype()).removeprefix("torch."),
                trust_remote_code=self.trust_remote_code,
                config=auto.AutoSAEConfig.coerce(auto_sae)
                if auto_sae is not None
                else auto.AutoSAEConfig(seed=self.seed),
                cache_dir=cache_dir,
                progress=progress,
            )
            resolved = replace(resolved, sae=str(folder), hookpoint=hookpoint)
        weights = _weights_file(resolved.sae, resolved.hookpoint)
        resolved = replace(resolved, sae_sha256=auto.file_sha256(weights))
        if resolved.threshold_quantile is not None and resolved.calibrated_threshold is None:
            if texts is None:
                texts = self.pool_texts(dataset)
            resolved = resolved.calibrate(texts, cache_dir=cache_dir)
        return resolved

    def pool_texts(self, dataset: Dataset) -> list[str]:
        """The texts this transform encodes, for every row of ``dataset``."""
        from hf_dataselect.sae.train import dataset_texts

        return dataset_texts(
            dataset,
            text=self.text,
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
        )

    def calibrate(self, texts: Sequence[str], *, cache_dir: str | os.PathLike | None = None) -> SAEFeatures:
        """Fix ``calibrated_threshold`` = the ``threshold_quantile`` of non-zero token activations on a seeded
        sample of ``calibration_rows`` of ``texts`` (cached, so a second run does not recompute it)."""
        from hf_dataselect.sae import auto
        from hf_dataselect.sae.train import texts_fingerprint

        if self.threshold_quantile is None:
            raise InputError("calibrate() needs threshold_quantile.")
        rows = auto.sample_rows(len(texts), self.calibration_rows, self.seed)
        sample = [texts[i] for i in rows]
        payload = {
            "texts": texts_fingerprint(sample),
            "model": auto.canonical_model_name(self.model),
            "sae": self.sae_sha256 or self.sae,
            "hookpoint": str(self.hookpoint),
            "max_length": self.max_length,
            "model_dtype": str(self.model_dtype()),
            "quantile": self.threshold_quantile,
        }
        path, value = auto.cached_threshold(payload, cache_dir)
        if value is None:
            activations = self.runtime().token_activation_values(sample)
            if activations.size == 0:
                raise InputError(
                    "No SAE activation is above 0 on the calibration rows; cannot calibrate a quantile."
                )
            value = float(np.quantile(activations, self.threshold_quantile))
            auto.store_threshold(
                path,
                {**payload, "threshold": value, "rows": len(sample), "activations": int(activations.size)},
            )
            logger.info(
                "Calibrated τ = %.4g: the %.3g-quantile of %d non-zero activations on %d rows.",
                value,
                self.threshold_quantile,
                activations.size,
                len(sample),
            )
        calibrated = replace(self, calibrated_threshold=value)
        runtime = self.__dict__.get("_runtime_object")
        if runtime is not None:  # the threshold does not change what is loaded
            calibrated.__dict__["_runtime_object"] = runtime
        return calibrated

    # -- the map callable -------------------------------------------------------------------------------------
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        if self.threshold_quantile is not None:
            if self.calibrated_threshold is None:
                raise InputError(
                    "threshold_quantile is calibrated on the whole pool, which a per-batch .map cannot see: build "
                    "the transform with SAEFeatures.for_pool(ds, ...) (or use add_sae_features(ds, ...)), or give "
                    "an absolute threshold."
                )
            return float(self.calibrated_threshold)
        return 0.0

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        if self.sae == AUTO:
            raise InputError(
                "sae='auto' trains an SAE on the whole pool, which a per-batch .map cannot see: use "
                "ds.map(SAEFeatures.for_pool(ds, ...), batched=True), or add_sae_features(ds, ...), or pass "
                "sae=<folder or Hub repo>."
            )
        threshold = self.effective_threshold()
        row_format = RowFormat.resolve(
            batch.keys(),
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
        )
        texts = row_format.batch_text(batch, part=self.text)
        indices, values, counts = self.runtime().features(texts, threshold)
        return {"sae_indices": indices, "sae_values": values, "sae_n_active": counts}

    def model_dtype(self) -> torch.dtype:
        """The dtype the model runs in (``"auto"`` resolved with :func:`hf_dataselect.models.fast_inference_dtype`)."""
        from hf_dataselect import models

        device = models.resolve_device(self.device)
        if self.dtype == "auto":
            return models.fast_inference_dtype(device)
        return models.resolve_dtype(self.dtype, device)

    def encode(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """``(indices, values, n_active)`` for ``texts`` (rows in input order)."""
        return self.runtime().features(list(texts), self.effective_threshold())

    def _build_runtime(self) -> _FeatureRunner:
        if self.sae == AUTO:
            raise InputError("sae='auto' must be resolved with SAEFeatures.for_pool(ds) before it can run.")
        return _FeatureRunner(self)


def _weights_file(sae: str, hookpoint: str | int | None) -> Path:
    from hf_dataselect.sae.io import (
        SAELENS_WEIGHTS,
        SPARSIFY_WEIGHTS,
        _looks_like_local_path,
        locate_hookpoint_folder,
    )

    path = Path(os.path.expanduser(sae))
    if path.exists():
        root = path
    elif _looks_like_local_path(sae):
        raise InputError(f"No such SAE folder: {sae}")
    else:
        from hf_dataselect.sae.hub import download_sae

        root = download_sae(sae, hookpoint)
    folder = locate_hookpoint_folder(root, hookpoint, source=sae)
    for name in (SPARSIFY_WEIGHTS, SAELENS_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    from hf_dataselect.sae.io import detect_format

    detect_format(folder)  # raises the precise error
    raise InputError(f"No SAE weights in {folder}.")


class _FeatureRunner:
    """The loaded model, tokenizer and SAE of one :class:`SAEFeatures` configuration."""

    def __init__(self, config: SAEFeatures) -> None:
        from hf_dataselect import models
        from hf_dataselect.sae.activations import load_reader, parse_hookpoint
        from hf_dataselect.sae.io import load_sae

        device = models.resolve_device(config.device)
        self.sae = load_sae(config.sae, config.hookpoint, device=device)
        hookpoint = parse_hookpoint(config.hookpoint)
        if hookpoint is None:
            hookpoint = parse_hookpoint(self.sae.hookpoint)
        self.reader = load_reader(
            config.model,
            hookpoint,
            max_length=config.max_length,
            batch_size=config.batch_size,
            device=str(device),
            dtype=config.model_dtype(),
            trust_remote_code=config.trust_remote_code,
        )
        recorded = self.sae.hookpoint
        if recorded and str(parse_hookpoint(recorded)) not in (
            self.reader.hookpoint.name,
            str(self.reader.hookpoint.layer_index),
        ):
            logger.warning(
                "The SAE was trained at hookpoint %r but features are read at %r.",
                recorded,
                self.reader.hookpoint.name,
            )
        width = self.reader.width
        if width != self.sae.d_in:
            raise InputError(
                f"The SAE reads {self.sae.d_in}-dimensional activations, but {config.model or 'the default encoder'} "
                f"outputs width {width} at hookpoint {self.reader.hookpoint.name!r}; use the model and hookpoint "
                "the SAE was trained on."
            )

    def pool(self, batch: TokenActivations) -> torch.Tensor:
        """``[rows, latents]``: each latent's maximum activation over each row's kept tokens (0 if none)."""
        import torch

        sae = self.sae
        rows = len(batch.rows)
        pooled = torch.zeros(rows * sae.num_latents, dtype=sae.dtype, device=sae.device)
        x = batch.activations.to(device=sae.device)  # encode takes bfloat16 hidden states as they are
        if x.shape[0]:
            with torch.no_grad():
                values, indices = sae.encode(x)
            lengths = torch.as_tensor(batch.lengths, device=sae.device)
            token_row = torch.repeat_interleave(torch.arange(rows, device=sae.device), lengths)
            flat = (token_row[:, None] * sae.num_latents + indices).reshape(-1)
            pooled.scatter_reduce_(0, flat, values.reshape(-1), reduce="amax", include_self=True)
        return pooled.view(rows, sae.num_latents)

    @staticmethod
    def active(pooled: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Latents above ``threshold`` per row of ``pooled``: ``(latent ids, values, counts)``, row-major with
        ascending latent ids within each row."""
        above = pooled > threshold
        where = above.nonzero()
        return (
            where[:, 1].cpu().numpy().astype(np.int32),
            pooled[where[:, 0], where[:, 1]].float().cpu().numpy(),
            above.sum(1).cpu().numpy(),
        )

    def features(
        self, texts: list[str], threshold: float
    ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        n = len(texts)
        indices: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * n
        values: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
        counts = np.zeros(n, dtype=np.int32)
        for batch in self.reader.batches(texts):
            latent_ids, latent_values, per_row = self.active(self.pool(batch), threshold)
            offsets = np.concatenate([[0], np.cumsum(per_row)])
            for position, row in enumerate(batch.rows):
                start, stop = offsets[position], offsets[position + 1]
                indices[row] = latent_ids[start:stop]
                values[row] = latent_values[start:stop]
                counts[row] = stop - start
        return indices, values, counts

    def token_activation_values(self, texts: list[str]) -> np.ndarray:
        """Every non-zero value of every token's code (for quantile calibration)."""
        import torch

        collected: list[np.ndarray] = []
        for batch in self.reader.batches(texts):
            x = batch.activations.to(device=self.sae.device, dtype=self.sae.dtype)
            if not x.shape[0]:
                continue
            with torch.no_grad():
                values, _ = self.sae.encode(x)
            collected.append(values[values > 0].float().cpu().numpy())
        return np.concatenate(collected) if collected else np.zeros(0, dtype=np.float32)


def add_sae_features(
    dataset: Dataset,
    *,
    cache_dir: str | os.PathLike | None = None,
    auto_sae: AutoSAEConfig | dict[str, Any] | None = None,
    map_batch_size: int = 1000,
    num_proc: int | None = None,
    progress: bool = True,
    **options: Any,
) -> Dataset:
    """``dataset`` with ``sae_indices``, ``sae_values``, ``sae_n_active``: :meth:`SAEFeatures.for_pool` + ``.map``.

    ``options`` are the fields of :class:`SAEFeatures`; existing SAE columns are replaced.
    """
    transform = SAEFeatures.for_pool(
        dataset, cache_dir=cache_dir, auto_sae=auto_sae, progress=progress, **options
    )
    logger.info(
        "SAE features of %d rows (SAE %s, hookpoint %s, τ = %.4g).",
        len(dataset),
        transform.sae,
        transform.hookpoint,
        transform.effective_threshold(),
    )
    return dataset.map(
        transform, batched=True, batch_size=map_batch_size, num_proc=num_proc, desc="SAE features"
    )
