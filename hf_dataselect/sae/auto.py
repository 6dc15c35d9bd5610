"""``sae="auto"``: a small TopK SAE trained on the pool's own activations, cached so later runs reuse it.

A per-batch ``.map`` callable never sees the whole pool, so the pool-trained SAE is resolved *before* mapping,
by :meth:`hf_dataselect.transforms.sae_features.SAEFeatures.for_pool`. The SAE is trained on a seeded sample of
at most ``max_rows`` rows, for about ``train_tokens`` tokens (several epochs over a disk cache of their
activations), and stored under::

    <cache_dir>/auto_sae/<key>/<hookpoint>/{cfg.json, sae.safetensors, hf_dataselect.json}

where ``key`` hashes the texts of the pool (as formatted for the transform), the model, the hookpoint, the
truncation length and the training options. Same pool + same options = same key = no retraining. The default
``cache_dir`` is ``$HF_DATASELECT_CACHE`` or ``$HF_HOME/hf_dataselect``.

Quantile thresholds (``threshold_quantile=``) are resolved the same way: calibrated once on a seeded sample of
the pool and cached under ``<cache_dir>/sae_thresholds/<key>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the model dtype is part of the key
"""Bumped when what a cached SAE or threshold means changes (the key includes it)."""


@dataclass
class AutoSAEConfig:
    """How the pool-trained SAE is made (defaults: width 16 x d_in, k = 32, about 2M training tokens)."""

    expansion_factor: int = 16
    k: int = 32
    max_rows: int = 20_000
    """Rows of the pool (a seeded sample when the pool is larger) whose activations train the SAE."""
    train_tokens: int = 2_000_000
    """Training tokens in all (epochs over the cached activations of the sampled rows)."""
    max_epochs: float = 20.0
    """Upper bound on passes over the sampled rows, for small pools."""
    batch_tokens: int = 1024
    lr_scale: float = 4.0
    """Multiplies the trainer's 1/sqrt(width) learning-rate rule: 2M tokens is a short run, and with batches of
    1,024 tokens and 4x the rule an SAE on MiniLM reaches FVU 0.13 (middle block) / 0.18 (last block) where
    the trainer's defaults (4,096 tokens, 1x, decay over the last 20 %) reach 0.22 / 0.28."""
    lr_decay_fraction: float = 0.5
    dead_tokens_threshold: int | None = None
    """Tokens without firing after which a latent is dead; default ``train_tokens // 20``."""
    lm_batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.expansion_factor < 1 or self.k < 1 or self.max_rows < 1 or self.train_tokens < 1:
            raise InputError("auto SAE options expansion_factor, k, max_rows and train_tokens must be ≥ 1.")
        if self.max_epochs <= 0 or self.batch_tokens < 1 or self.lm_batch_size < 1 or self.lr_scale <= 0:
            raise InputError(
                "auto SAE options max_epochs, batch_tokens, lm_batch_size and lr_scale must be positive."
            )
        if not 0 <= self.lr_decay_fraction < 1:
            raise InputError("auto SAE option lr_decay_fraction must be in [0, 1).")

    @classmethod
    def coerce(cls, value: AutoSAEConfig | dict[str, Any] | None) -> AutoSAEConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise InputError(f"Unknown auto SAE option(s) {unknown}; known: {sorted(known)}.")
            return cls(**value)
        raise InputError(f"auto_sae must be an AutoSAEConfig or a dict, got {type(value).__name__}.")


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_DATASELECT_CACHE") or Path(constants.HF_HOME) / "hf_dataselect")


def canonical_model_name(model: str | None) -> str:
    """The default-encoder aliases all become its Hub id, so they share cached SAEs and model cards."""
    from hf_dataselect import models

    resolved = models.resolve_model_name(model)
    return models.DEFAULT_ENCODER_NAME if resolved == models.default_encoder_path() else str(model)


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Positions of the rows used (all of them when ``n <= max_rows``), sorted."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 11]).choice(n, max_rows, replace=False))


def count_tokens(
    model: str | None, texts: Sequence[str], max_length: int | None, trust_remote_code: bool
) -> int:
    """Non-special tokens of ``texts`` after truncation (what the SAE trains on), from the tokenizer alone."""
    from hf_dataselect import models
    from hf_dataselect.sae.activations import MAX_DEFAULT_LENGTH

    tokenizer = models.load_tokenizer(model, trust_remote_code=trust_remote_code)
    config = models.load_config(model, trust_remote_code=trust_remote_code)
    model_max = getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_LENGTH
    length = int(max_length or min(model_max, MAX_DEFAULT_LENGTH))
    special = set(tokenizer.all_special_ids)
    total = 0
    for start in range(0, len(texts), 2048):
        encoded = tokenizer(list(texts[start : start + 2048]), truncation=True, max_length=length)
        total += sum(sum(1 for t in ids if t not in special) for ids in encoded["input_ids"])
    return total


def pool_sae(
    texts: Sequence[str],
    *,
    model: str | None,
    hookpoint: str | int | None,
    max_length: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    config: AutoSAEConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Path, str]:
    """The folder of the pool-trained SAE (trained now, or found in the cache) and its hookpoint name."""
    from hf_dataselect.sae.io import list_hookpoints
    from hf_dataselect.sae.train import SAETrainingConfig, texts_fingerprint, train_sae

    config = config or AutoSAEConfig()
    config.validate()
    rows = sample_rows(len(texts), config.max_rows, config.seed)
    sample = [texts[i] for i in rows]
    key = _key(
        {
            "format": CACHE_FORMAT,
            "texts": texts_fingerprint(sample),
            "model": canonical_model_name(model),
            "hookpoint": None if hookpoint is None else str(hookpoint),
            "max_length": max_length,
            "dtype": dtype,
            "config": asdict(config),
        }
    )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "auto_sae" / key
    found = list_hookpoints(folder)
    if len(found) == 1:
        name, path = next(iter(found.items()))
        logger.info("Reusing the pool-trained SAE in %s.", path)
        return path, name

    tokens = count_tokens(model, sample, max_length, trust_remote_code)
    if tokens == 0:
        raise InputError(
            "The pool has no tokens to train an SAE on (every text is empty after tokenisation)."
        )
    batch_tokens = min(config.batch_tokens, tokens)
    train_tokens = int(min(config.train_tokens, config.max_epochs * tokens))
    max_tokens = max(batch_tokens, (train_tokens // batch_tokens) * batch_tokens)
    training = SAETrainingConfig(
        expansion_factor=config.expansion_factor,
        k=config.k,
        batch_tokens=batch_tokens,
        lr_scale=config.lr_scale,
        lr_decay_fraction=config.lr_decay_fraction,
        max_tokens=max_tokens,
        dead_tokens_threshold=config.dead_tokens_threshold or max(batch_tokens, config.train_tokens // 20),
        lm_batch_size=config.lm_batch_size,
        max_length=max_length,
        seed=config.seed,
        device=device,
        model_dtype=dtype,
        log_every=max(1, (max_tokens // batch_tokens) // 50),
    )
    logger.info(
        "Training a pool SAE (%d rows, %d tokens, %d training tokens, width %dx, k=%d); it is cached in %s.",
        len(sample),
        tokens,
        max_tokens,
        config.expansion_factor,
        config.k,
        folder,
    )
    partial = folder.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    sae = train_sae(
        model,
        sample,
        hookpoint,
        config=training,
        output_dir=partial,
        dataset_name=f"the selection pool ({len(sample)} of {len(texts)} rows)",
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished the same SAE first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    name = sae.metadata["hookpoint"]
    return folder / name, name


def cached_threshold(
    key_payload: dict[str, Any], cache_dir: str | os.PathLike | None
) -> tuple[Path, float | None]:
    """Path of the cached calibration for ``key_payload`` and its value when present."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "sae_thresholds" / f"{_key({'format': CACHE_FORMAT, **key_payload})}.json"
    if path.is_file():
        return path, float(json.loads(path.read_text())["threshold"])
    return path, None


def store_threshold(path: Path, record: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(record, indent=1, default=str))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
