"""Training a TopK SAE on a model's hidden states, following Gao et al. 2024 ("Scaling and evaluating sparse
autoencoders") as EleutherAI sparsify implements it:

* loss = FVU (fraction of variance unexplained) + ``auxk_alpha`` x AuxK, where AuxK lets the latents that have
  not fired for ``dead_tokens_threshold`` tokens reconstruct the residual (this revives dead latents);
* decoder rows kept at unit norm, with the gradient component parallel to each row removed before every step;
* ``b_dec`` initialised from the mean (or geometric median) of the first batch;
* Adam with ``lr = 2e-4 / sqrt(num_latents / 2**14)`` unless given, linear warm-up, and a linear decay to 0 over
  the last ``lr_decay_fraction`` of the run when its length is known.

    from hf_dataselect import train_sae
    sae = train_sae("meta-llama/Llama-3.2-1B", ds, hookpoint="model.layers.12", output_dir="sae/", k=32)

Activations come from :mod:`hf_dataselect.sae.store` (a disk cache or a streamed shuffle buffer), so the whole
activation set is never in memory. Checkpoints (safetensors + JSON) are written to ``checkpoint_dir`` every
``checkpoint_every`` steps and ``resume=True`` continues exactly where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hf_dataselect.sae.activations import HiddenStateReader
    from hf_dataselect.sae.model import TopKSAE

logger = logging.getLogger(__name__)

B_DEC_INITS = ("mean", "geometric_median", "zeros")


@dataclass
class SAETrainingConfig:
    """Options of :func:`train_sae` (also the flags of ``hf-dataselect train-sae``)."""

    expansion_factor: int = field(default=16, metadata={"help": "Latents = expansion_factor x d_in."})
    num_latents: int | None = field(
        default=None, metadata={"help": "Number of latents (overrides expansion_factor)."}
    )
    k: int = field(default=32, metadata={"help": "Active latents per token (TopK)."})
    batch_tokens: int = field(default=4096, metadata={"help": "Tokens per optimisation step."})
    lr: float | None = field(
        default=None,
        metadata={"help": "Adam learning rate; default lr_scale x 2e-4 / sqrt(num_latents / 2**14)."},
    )
    lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies the default learning-rate rule (ignored when lr is given). Gao et al.'s rule "
            "comes from long runs; short runs on few tokens converge faster with 4x (benchmarks/results/sae.md)."
        },
    )
    lr_warmup_steps: int = field(
        default=1000,
        metadata={"help": "Linear warm-up steps (at most a tenth of the run when its length is known)."},
    )
    lr_decay_fraction: float = field(
        default=0.2, metadata={"help": "Linear decay to 0 over this final fraction of a run of known length."}
    )
    auxk_alpha: float = field(default=1 / 32, metadata={"help": "Weight of the AuxK loss (0 turns it off)."})
    dead_tokens_threshold: int = field(
        default=1_000_000,
        metadata={
            "help": "A latent that has not fired for this many tokens is dead (Gao et al. use 10M tokens "
            "on runs of billions of tokens; pools are smaller)."
        },
    )
    b_dec_init: str = field(
        default="mean", metadata={"help": "Decoder bias initialisation: mean, geometric_median or zeros."}
    )
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Stop after this many training tokens (overrides epochs)."}
    )
    cache_activations: bool = field(
        default=True,
        metadata={
            "help": "Run the model once and keep activations in a disk cache for all epochs (else stream "
            "them through a shuffle buffer and rerun the model every epoch)."
        },
    )
    cache_dtype: str = field(default="float32", metadata={"help": "Disk cache dtype: float32 or float16."})
    buffer_tokens: int = field(
        default=131072, metadata={"help": "Shuffle-buffer size in tokens when streaming."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate texts to this many tokens (default: context, ≤ 2048)."}
    )
    lm_batch_size: int = field(default=32, metadata={"help": "Texts per model forward pass."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of rows held out to measure FVU after training."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and held-out rows."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Write a checkpoint every this many steps (0: only at the end)."}
    )
    log_every: int = field(default=10, metadata={"help": "Steps between progress-bar/log updates."})
    device: str | None = field(default=None, metadata={"help": "Device of the model and the SAE."})
    model_dtype: str = field(default="auto", metadata={"help": "dtype of the model (auto: fp32 on CPU)."})
    sae_dtype: str = field(default="float32", metadata={"help": "dtype of the SAE parameters."})

    def validate(self) -> None:
        checks = [
            (self.expansion_factor >= 1, f"expansion_factor must be ≥ 1, got {self.expansion_factor}"),
            (self.num_latents is None or self.num_latents >= 1, "num_latents must be ≥ 1"),
            (self.k >= 1, f"k must be ≥ 1, got {self.k}"),
            (self.batch_tokens >= 1, f"batch_tokens must be ≥ 1, got {self.batch_tokens}"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.lr_scale > 0, f"lr_scale must be positive, got {self.lr_scale}"),
            (self.lr_warmup_steps >= 0, "lr_warmup_steps must be ≥ 0"),
            (0 <= self.lr_decay_fraction < 1, "lr_decay_fraction must be in [0, 1)"),
            (self.auxk_alpha >= 0, "auxk_alpha must be ≥ 0"),
            (self.dead_tokens_threshold >= 1, "dead_tokens_threshold must be ≥ 1"),
            (self.b_dec_init in B_DEC_INITS, f"b_dec_init must be one of {list(B_DEC_INITS)}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (
                self.max_tokens is None or self.max_tokens >= self.batch_tokens,
                "max_tokens must be ≥ batch_tokens",
            ),
            (self.cache_dtype in ("float32", "float16"), "cache_dtype must be float32 or float16"),
            (self.lm_batch_size >= 1, "lm_batch_size must be ≥ 1"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.checkpoint_every >= 0, "checkpoint_every must be ≥ 0"),
            (self.log_every >= 1, "log_every must be ≥ 1"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise InputError("Invalid SAE training options: " + "; ".join(errors) + ".")

    def latents_for(self, d_in: int) -> int:
        return self.num_latents or self.expansion_factor * d_in

    def learning_rate(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else self.lr_scale * 2e-4 / math.sqrt(num_latents / 2**14)


# -- the optimisation loop -------------------------------------------------------------------------------------
class SAETrainer:
    """Adam steps on batches of activations, with the decoder constraints and dead-latent bookkeeping."""

    def __init__(self, sae: TopKSAE, config: SAETrainingConfig, *, total_steps: int | None) -> None:
        import torch

        self.sae = sae
        self.config = config
        self.total_steps = total_steps
        self.base_lr = config.learning_rate(sae.num_latents)
        self.warmup_steps = (
            min(config.lr_warmup_steps, max(1, total_steps // 10)) if total_steps else config.lr_warmup_steps
        )
        self.decay_steps = int(total_steps * config.lr_decay_fraction) if total_steps else 0
        self.optimizer = make_adam(sae, self.base_lr)
        self.tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=sae.device)
        self.step_count = 0
        self.tokens_seen = 0

    def lr_at(self, step: int) -> float:
        factor = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        elif self.total_steps and self.decay_steps and step >= self.total_steps - self.decay_steps:
            factor = (self.total_steps - step) / self.decay_steps
        return self.base_lr * factor

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.config.dead_tokens_threshold

    def initialize_b_dec(self, batch: torch.Tensor) -> None:
        import torch

        with torch.no_grad():
            if self.config.b_dec_init == "mean":
                self.sae.b_dec.copy_(batch.mean(0))
            elif self.config.b_dec_init == "geometric_median":
                self.sae.b_dec.copy_(geometric_median(batch))

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        """One optimisation step on ``batch [tokens, d_in]``; returns its metrics."""
        import torch

        batch = batch.to(device=self.sae.device, dtype=self.sae.dtype)
        if self.step_count == 0:
            self.initialize_b_dec(batch)
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead = self.dead_mask() if self.config.auxk_alpha > 0 else None
        output = self.sae(batch, dead_mask=dead)
        loss = output.fvu + self.config.auxk_alpha * output.auxk_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sae.cfg.normalize_decoder:
            self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        if self.sae.cfg.normalize_decoder:
            self.sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            active = output.top_values > 0
            fired = output.top_indices[active]
            self.tokens_since_fired += batch.shape[0]
            self.tokens_since_fired[fired] = 0
            l0 = float(active.sum(-1).float().mean())
        self.step_count += 1
        self.tokens_seen += int(batch.shape[0])
        return {
            "fvu": float(output.fvu.detach()),
            "auxk_loss": float(output.auxk_loss.detach()),
            "l0": l0,
            "dead_fraction": float(self.dead_mask().float().mean()),
            "lr": lr,
        }

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write ``folder`` atomically: SAE weights, optimizer/trainer tensors, and JSON state."""
        from safetensors.torch import save_file

        optimizer_tensors = {"tokens_since_fired": self.tokens_since_fired}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        adam_steps: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                param_state = self.optimizer.state.get(parameter)
                if not param_state:
                    continue
                name = names[id(parameter)]
                optimizer_tensors[f"adam.{name}.exp_avg"] = param_state["exp_avg"]
                optimizer_tensors[f"adam.{name}.exp_avg_sq"] = param_state["exp_avg_sq"]
                adam_steps[name] = float(param_state["step"])
        optimizer_tensors.update(tensors)
        full_state = {
            **state,
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "adam_steps": adam_steps,
            "config": asdict(self.config),
            "sae_config": self.sae.cfg.to_dict(),
        }
        with atomic.staging_folder(folder, name=folder.name + ".partial") as partial:
            save_file(
                {k: v.detach().contiguous() for k, v in self.sae.state_dict().items()},
                partial / "sae.safetensors",
            )
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in optimizer_tensors.items()},
                partial / "trainer.safetensors",
            )
            (partial / "state.json").write_text(json.dumps(full_state, indent=1))

    def load_checkpoint(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore weights, Adam state and counters; returns the JSON state and the extra tensors."""
        import torch
        from safetensors.torch import load_file

        state = json.loads((folder / "state.json").read_text())
        self.sae.load_state_dict(load_file(folder / "sae.safetensors", device=str(self.sae.device)))
        tensors = load_file(folder / "trainer.safetensors", device=str(self.sae.device))
        self.tokens_since_fired = tensors.pop("tokens_since_fired").to(torch.long)
        for name, parameter in self.sae.named_parameters():
            if f"adam.{name}.exp_avg" in tensors:
                self.optimizer.state[parameter] = {
                    "step": torch.tensor(
                        state["adam_steps"][name], dtype=torch.float32, device=parameter.device
                    ),
                    "exp_avg": tensors.pop(f"adam.{name}.exp_avg"),
                    "exp_avg_sq": tensors.pop(f"adam.{name}.exp_avg_sq"),
                }
        self.step_count = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        return state, tensors


def make_adam(sae: TopKSAE, lr: float) -> torch.optim.Adam:
    """Adam as in Gao et al. 2024 (eps 6.25e-10); the fused kernel where PyTorch has one (3x faster on CPU)."""
    import torch

    options = {"lr": lr, "betas": (0.9, 0.999), "eps": 6.25e-10}
    if sae.device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(sae.parameters(), fused=True, **options)
        except (RuntimeError, ValueError):  # dtype or device without a fused kernel
            pass
    return torch.optim.Adam(sae.parameters(), **options)


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points``."""
    import torch

    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if torch.norm(updated - median) <= tol * max(1.0, float(median.norm())):
            median = updated
            break
        median = updated
    return median.float()


# -- evaluation ---------------------------------------------------------------------------------------------------
def evaluate_sae(
    sae: TopKSAE, reader: HiddenStateReader, texts: Sequence[str], *, progress: bool = False
) -> dict[str, float]:
    """FVU, mean L0 and the fraction of latents that never fire, over the tokens of ``texts``."""
    import torch

    from hf_dataselect.sae.store import read_rows

    squared_error = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_sq = 0.0
    tokens = 0
    l0_total = 0.0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=sae.device)
    with torch.no_grad():
        for batch in read_rows(reader, list(texts)):
            x = batch.activations.to(device=sae.device, dtype=sae.dtype)
            if x.shape[0] == 0:
                continue
            values, indices = sae.encode(x)
            reconstruction = sae.decode(values, indices)
            squared_error += float((x - reconstruction).double().pow(2).sum())
            sum_x += x.double().sum(0).cpu()
            sum_sq += float(x.double().pow(2).sum())
            tokens += x.shape[0]
            active = values > 0
            l0_total += float(active.sum())
            fired[indices[active]] = True
    if tokens == 0:
        return {"fvu": float("nan"), "l0": 0.0, "dead_fraction": 1.0, "tokens": 0}
    total_variance = sum_sq - float(sum_x.pow(2).sum()) / tokens
    return {
        "fvu": squared_error / max(total_variance, 1e-30),
        "l0": l0_total / tokens,
        "dead_fraction": float((~fired).float().mean()),
        "tokens": tokens,
    }


# -- the public entry point ------------------------------------------------------------------------------------
def dataset_texts(
    dataset: Dataset | str | os.PathLike | Sequence[str],
    *,
    text: str = "prompt_response",
    prompt_column: str | None = None,
    response_column: str | None = None,
    formatter: Callable[..., tuple[str, str]] | None = None,
) -> list[str]:
    """The texts of a pool (a ``Dataset``, a path or Hub id for :func:`load_pool`, or a list of strings)."""
    from hf_dataselect.data import load_pool, pool_prompt_response
    from hf_dataselect.formatting import RowFormat, check_texts, join_parts

    if isinstance(dataset, list | tuple) and all(isinstance(t, str) for t in dataset):
        texts = list(dataset)
        if not any(t.strip() for t in texts):
            raise InputError("Every text is empty.")
        return texts
    if isinstance(dataset, str | os.PathLike):
        dataset = load_pool(dataset)
    row_format = RowFormat.resolve(
        dataset.column_names,
        prompt_column=prompt_column,
        response_column=response_column,
        formatter=formatter,
    )
    prompts, responses = pool_prompt_response(dataset, row_format)
    check_texts(prompts, responses)
    return [join_parts(p, r, part=text) for p, r in zip(prompts, responses, strict=True)]


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts (order-sensitive), used to key caches."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def train_sae(
    model: str | PreTrainedModel | None,
    dataset: Dataset | str | os.PathLike | Sequence[str],
    hookpoint: str | int | None = None,
    *,
    config: SAETrainingConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    text: str = "prompt_response",
    prompt_column: str | None = None,
    response_column: str | None = None,
    formatter: Callable[..., tuple[str, str]] | None = None,
    dataset_name: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    **options: Any,
) -> TopKSAE:
    """Train a TopK SAE on ``model``'s hidden states at ``hookpoint`` over the texts of ``dataset``.

    ``model``: a path or Hub id (``None``: the offline all-MiniLM-L6-v2), or a loaded ``PreTrainedModel`` with
    ``tokenizer=``. ``hookpoint``: a module path (``"model.layers.12"``, ``"encoder.layer.3"``) or a layer index
    (default: the last block). ``options`` override fields of :class:`SAETrainingConfig` (``k=64``...).
    Special-token and padding positions are excluded. The SAE is returned; with ``output_dir`` it is also
    saved (sparsify layout + metadata + model card). Its ``metadata`` holds the training facts and metrics and
    ``training_history`` the logged metrics.
    """
    from hf_dataselect import __version__, models
    from hf_dataselect.formatting import TEXT_PARTS
    from hf_dataselect.sae.activations import HiddenStateReader, load_reader
    from hf_dataselect.sae.model import TopKSAE
    from hf_dataselect.sae.store import DiskActivations, DiskBatches, StreamedActivations, StreamState

    config = replace(config or SAETrainingConfig(), **_known_options(options))
    config.validate()
    if text not in TEXT_PARTS:
        raise InputError(f"text must be one of {list(TEXT_PARTS)}, got {text!r}.")
    if resume and checkpoint_dir is None:
        raise InputError("resume=True needs checkpoint_dir= (the folder the checkpoints were written to).")
    texts = dataset_texts(
        dataset, text=text, prompt_column=prompt_column, response_column=response_column, formatter=formatter
    )
    if dataset_name is None and isinstance(dataset, str | os.PathLike):
        dataset_name = str(dataset)
    train_texts, eval_texts = split_texts(texts, config.eval_fraction, config.seed)

    if model is None or isinstance(model, str | os.PathLike):
        from hf_dataselect.sae.auto import canonical_model_name

        base_model = canonical_model_name(None if model is None else str(model))
        reader = load_reader(
            None if model is None else str(model),
            hookpoint,
            max_length=config.max_length,
            batch_size=config.lm_batch_size,
            device=config.device,
            dtype=config.model_dtype,
            trust_remote_code=trust_remote_code,
        )
    else:
        if tokenizer is None:
            raise InputError("A loaded model needs tokenizer= as well.")
        base_model = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        reader = HiddenStateReader(
            model, tokenizer, hookpoint, max_length=config.max_length, batch_size=config.lm_batch_size
        )
    d_in = reader.width
    device = reader.device if config.device is None else models.resolve_device(config.device)
    sae_dtype = models.resolve_dtype(config.sae_dtype, device)
    sae = TopKSAE(d_in, config.latents_for(d_in), config.k, device=device, dtype=sae_dtype, seed=config.seed)
    checkpoint_path = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir is not None else None
    if checkpoint_path is not None and not resume and checkpoint_path.exists():
        raise InputError(
            f"{checkpoint_path} already holds a checkpoint; pass resume=True (--resume) to continue it, or "
            "choose another checkpoint_dir."
        )
    if resume and not (checkpoint_path and (checkpoint_path / "state.json").is_file()):
        raise InputError(f"No checkpoint to resume in {checkpoint_dir}.")

    data_key = hashlib.sha256(
        json.dumps(
            [
                base_model,
                reader.hookpoint.name,
                reader.max_length,
                texts_fingerprint(train_texts),
                config.cache_dtype,
            ]
        ).encode()
    ).hexdigest()
    temporary: str | None = None
    if config.cache_activations:
        if checkpoint_dir is not None:
            cache_folder = Path(checkpoint_dir) / "activations"
        else:
            temporary = tempfile.mkdtemp(prefix="hf_dataselect_sae_")
            cache_folder = Path(temporary) / "activations"
        cache = DiskActivations.open(cache_folder, data_key) or DiskActivations.build(
            reader, train_texts, cache_folder, key=data_key, dtype=config.cache_dtype, progress=progress
        )
        source: Any = DiskBatches(cache, config.batch_tokens, config.seed)
        distinct_tokens = cache.num_tokens
        if config.max_tokens is not None:
            total_steps: int | None = config.max_tokens // config.batch_tokens
        else:
            total_steps = source.steps_for(config.epochs)
    else:
        source = None
        distinct_tokens = None
        total_steps = config.max_tokens // config.batch_tokens if config.max_tokens is not None else None

    trainer = SAETrainer(sae, config, total_steps=total_steps)
    history: list[dict[str, float]] = []
    stream_state = None
    if resume:
        assert checkpoint_path is not None
        state, tensors = trainer.load_checkpoint(checkpoint_path)
        _check_resumable(state, config, data_key)
        history = state.get("history", [])
        if state.get("stream") is not None:
            stream_state = StreamState(**state["stream"], carry=tensors.get("stream.carry"))
        logger.info("Resumed from %s at step %d.", checkpoint_path, trainer.step_count)
    if source is None:
        source = StreamedActivations(
            reader,
            train_texts,
            config.batch_tokens,
            buffer_tokens=config.buffer_tokens,
            seed=config.seed,
            epochs=config.epochs if config.max_tokens is None else None,
            state=stream_state,
        )

    try:
        _run(trainer, source, total_steps, history, checkpoint_path, data_key, progress)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    recent = history[-max(1, min(5, len(history) // 10)) :]
    metadata: dict[str, Any] = {
        "library": "hf_dataselect",
        "library_version": __version__,
        "base_model": base_model,
        "hookpoint": reader.hookpoint.name,
        "d_in": d_in,
        "num_latents": sae.num_latents,
        "expansion_factor": sae.num_latents / d_in,
        "k": sae.k,
        "training_tokens": trainer.tokens_seen,
        "training_steps": trainer.step_count,
        "training_rows": len(train_texts),
        "distinct_training_tokens": distinct_tokens,
        "dataset": dataset_name,
        "text": text,
        "max_length": reader.max_length,
        "special_tokens_excluded": True,
        "batch_tokens": config.batch_tokens,
        "lr": trainer.base_lr,
        "lr_warmup_steps": trainer.warmup_steps,
        "auxk_alpha": config.auxk_alpha,
        "dead_tokens_threshold": config.dead_tokens_threshold,
        "seed": config.seed,
        "fvu": float(np.mean([h["fvu"] for h in recent])) if recent else None,
        "l0": float(np.mean([h["l0"] for h in recent])) if recent else None,
        "dead_fraction": float(trainer.dead_mask().float().mean()),
    }
    if eval_texts:
        evaluation = evaluate_sae(sae, reader, eval_texts)
        metadata.update({f"eval_{key}": value for key, value in evaluation.items()})
        metadata["eval_rows"] = len(eval_texts)
    sae.metadata.update(metadata)
    sae.training_history = history
    if output_dir is not None:
        sae.save_pretrained(output_dir, hookpoint=reader.hookpoint.name)
        logger.info("Saved the SAE to %s.", output_dir)
    return sae


def _run(
    trainer: SAETrainer,
    source: Any,
    total_steps: int | None,
    history: list[dict[str, float]],
    checkpoint_path: Path | None,
    data_key: str,
    progress: bool,
) -> None:
    import torch
    from tqdm.auto import tqdm

    config = trainer.config
    window: deque[dict[str, float]] = deque()
    bar = tqdm(
        total=total_steps, initial=trainer.step_count, desc="Training SAE", unit="step", disable=not progress
    )
    started = time.perf_counter()
    tokens_at_start = trainer.tokens_seen
    last_checkpoint = trainer.step_count

    def checkpoint() -> None:
        if checkpoint_path is None:
            return
        stream = source.state()
        tensors = {}
        stream_json = None
        if stream is not None:
            stream_json = {k: v for k, v in asdict(stream).items() if k != "carry"}
            if stream.carry is not None:
                tensors["stream.carry"] = stream.carry
        trainer.save_checkpoint(
            checkpoint_path, {"history": history, "stream": stream_json, "data_key": data_key}, tensors
        )

    for batch in source.iterate(trainer.step_count, total_steps):
        metrics = trainer.step(torch.as_tensor(batch))
        window.append(metrics)
        if trainer.step_count % config.log_every == 0 or trainer.step_count == total_steps:
            elapsed = max(time.perf_counter() - started, 1e-9)
            summary = {key: float(np.mean([m[key] for m in window])) for key in ("fvu", "auxk_loss", "l0")}
            summary.update(
                step=trainer.step_count,
                tokens=trainer.tokens_seen,
                dead_fraction=metrics["dead_fraction"],
                lr=metrics["lr"],
                tokens_per_s=(trainer.tokens_seen - tokens_at_start) / elapsed,
            )
            history.append(summary)
            window.clear()
            bar.set_postfix(
                fvu=f"{summary['fvu']:.3f}",
                l0=f"{summary['l0']:.1f}",
                dead=f"{100 * summary['dead_fraction']:.1f}%",
                tok_s=f"{summary['tokens_per_s']:.0f}",
            )
        bar.update(1)
        if config.checkpoint_every and trainer.step_count - last_checkpoint >= config.checkpoint_every:
            checkpoint()
            last_checkpoint = trainer.step_count
    bar.close()
    if trainer.step_count == 0:
        raise InputError("No training step was run: the rows hold fewer tokens than one batch.")
    checkpoint()


def split_texts(texts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``eval_fraction`` of the rows (chosen with ``seed``); at least one row stays for training."""
    if eval_fraction <= 0 or len(texts) < 2:
        return texts, []
    n_eval = min(len(texts) - 1, max(1, round(eval_fraction * len(texts))))
    chosen = np.random.default_rng([seed, 7]).choice(len(texts), n_eval, replace=False)
    held = np.zeros(len(texts), dtype=bool)
    held[chosen] = True
    return [t for t, h in zip(texts, held, strict=True) if not h], [
        t for t, h in zip(texts, held, strict=True) if h
    ]


_RESUME_FREE = {"checkpoint_every", "log_every", "device", "epochs", "max_tokens"}


def _check_resumable(state: dict[str, Any], config: SAETrainingConfig, data_key: str) -> None:
    saved = state.get("config", {})
    # an option newer than the checkpoint was at its default when the checkpoint was written
    changed = sorted(
        f.name
        for f in fields(config)
        if f.name not in _RESUME_FREE and saved.get(f.name, f.default) != getattr(config, f.name)
    )
    if changed:
        raise InputError(f"Cannot resume: option(s) {changed} differ from the checkpoint's.")
    if state.get("data_key") != data_key:
        raise InputError(
            "Cannot resume: the model, hookpoint or training texts differ from the checkpoint's."
        )


def _known_options(options: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(SAETrainingConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"Unknown SAE training option(s) {unknown}; known: {sorted(known)}.")
    return options
