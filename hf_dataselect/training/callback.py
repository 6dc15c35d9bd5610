"""``DataSelectionCallback``: iterative kMQ inside a stock ``transformers.Trainer`` or ``trl.SFTTrainer``.

One round per epoch. Before the first epoch the callback selects ``budget_per_epoch`` rows with kMQ; after
every epoch it scores the rows just trained with the current model, reweights the clusters and selects the
next epoch's rows among those never trained on (:class:`~hf_dataselect.selection.iterative_kmq.IterativeKMQ`).
The epoch length never changes, so the step count and the learning-rate schedule are fixed at the start::

    selection = DataSelectionCallback(budget_per_epoch=1000, scorer="reward", reward_model="path/to/rm")
    trainer = SFTTrainer(model=..., args=SFTConfig(num_train_epochs=3, ...), train_dataset=pool,
                         callbacks=[selection])
    selection.attach(trainer)          # the one extra line: gives the trainer the selection sampler
    trainer.train()

How it plugs in (the facts in ARCHITECTURE.md): :meth:`DataSelectionCallback.attach` makes the trainer build
its training dataloader on a :class:`~hf_dataselect.training.sampler.SelectionSampler` of fixed length, whose
rows the callback replaces in ``on_epoch_begin``. The trainer keeps its own (possibly preprocessed) dataset;
the callback reads text, clusters and ids from the *pool*: by default the trainer's own ``train_dataset``
(SFTTrainer keeps the original columns next to the tokens, so the positions agree even when it dropped rows),
or a dataset you pass as ``pool=`` with an id column both share (or the same rows in the same order).

Under several processes every rank holds the same selection (scores are gathered from all ranks, and the
update is a deterministic function of them), and accelerate gives each rank a disjoint shard of it. Each
epoch's selection, scores and weights go to ``<output_dir>/data_selection/epoch-NNN.json`` (atomic writes), are
copied into every checkpoint, and a compact state (weights and digests) is stored in the checkpoint's
``trainer_state.json``: ``trainer.train(resume_from_checkpoint=...)`` replays exactly the same selections.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import TrainerCallback

from hf_dataselect import atomic
from hf_dataselect.errors import InputError
from hf_dataselect.selection.iterative_kmq import ALLOCATIONS, IterativeKMQ, positions_digest
from hf_dataselect.training.sampler import SelectionSampler
from hf_dataselect.training.scorers import Scorer, check_scores, describe_scorer, make_scorer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from hf_dataselect.formatting import RowFormat

logger = logging.getLogger("hf_dataselect.training")

STATE_KEY = "hf_dataselect.DataSelectionCallback"
"""Key of the callback's state in ``TrainerState.stateful_callbacks`` (saved in every ``trainer_state.json``).
Deliberately not the class name, so ``restore_callback_states_from_checkpoint`` never re-creates the callback."""
STATE_VERSION = 1


@dataclass
class DataSelectionConfig:
    """Options of :class:`DataSelectionCallback` (all JSON/YAML friendly, so recipes can hold them)."""

    budget_per_epoch: float = 0.1
    """Rows trained per epoch: a number of rows (an int, or a whole number > 1), or a fraction of the pool in
    (0, 1]. Typed ``float`` so that ``HfArgumentParser``/YAML recipes can hold either."""
    scorer: str = "reward"
    """``reward`` (reward model: gold vs generated), ``perplexity`` (PPL gap, with generation) or ``loss``
    (gold loss, no generation). A callable can be passed to the callback as ``scorer=`` instead."""
    reward_model: str | None = None
    """Sequence-classification reward model for ``scorer="reward"`` (path or Hub id, safetensors)."""
    temperature: float = 1.0
    """``T`` of the cluster reweighting ``w ← w · softmax(s / T)``."""
    allocation: str = "largest_remainder"
    """How a round's rows are split over clusters: ``largest_remainder`` or ``multinomial``."""
    quality_column: str | None = None
    """Optional numeric column for in-cluster sampling ∝ exp(q / quality_temperature), as in kMQ."""
    quality_temperature: float = 1.0
    cluster_column: str = "cluster"
    """Cluster ids to reuse when the pool has them; otherwise k-means runs on ``embedding_column``."""
    embedding_column: str = "embedding"
    """Embeddings to cluster; computed with :class:`~hf_dataselect.Embeddings` when missing."""
    embedding_model: str | None = None
    """Encoder for missing embeddings (``None``: the offline all-MiniLM-L6-v2)."""
    embedding_text: str = "prompt_response"
    k: int | None = None
    """Number of clusters; ``None`` chooses it by silhouette."""
    k_grid: list[int] | None = None
    kmeans_backend: str = "auto"
    kmeans_niter: int = 20
    seed: int | None = None
    """Seeds clustering, selection and the per-epoch shuffle; ``None``: ``TrainingArguments.seed``."""
    id_column: str | None = None
    """Column of row ids shared by ``pool`` and the trainer's dataset (default: ``id``/``row_id``/... if both
    have one)."""
    prompt_column: str | None = None
    response_column: str | None = None
    row_format: str | None = None
    """How rows become (prompt, gold response) when auto-detection is not enough."""
    max_new_tokens: int = 256
    """Length of the generated answers (``reward`` and ``perplexity`` scorers)."""
    scoring_batch_size: int = 8
    max_length: int | None = 1024
    """Longest (prompt + response) the scorers feed to a model, in tokens."""
    chat_template: bool | None = None
    """Format prompts with the tokenizer's chat template when scoring (``None``: when it has one)."""
    scorer_options: dict[str, Any] = field(default_factory=dict)
    """Further options of the built-in scorer (e.g. ``generation_kwargs``, ``reward_batch_size``)."""
    score_rows: int | None = None
    """Score at most this many of an epoch's rows (a seeded random subset); ``None``: all of them."""
    score_last_epoch: bool = False
    """Also score after the final epoch (only informative: no epoch follows that would use the weights)."""
    preflight_rows: int = 2
    """Rows scored once before training, so a broken scorer fails before the first step (0: skip)."""
    shuffle: bool = True
    """Shuffle each epoch's rows (seeded by seed and epoch)."""
    output_subdir: str = "data_selection"
    """Folder under ``output_dir`` (and in each checkpoint) with the per-epoch JSON files."""

    def validate(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}.")
        for name in ("temperature", "quality_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value!r}.")
        if self.score_rows is not None and self.score_rows < 1:
            raise InputError(f"score_rows must be a positive number of rows or None, got {self.score_rows}.")
        if self.preflight_rows < 0:
            raise InputError(f"preflight_rows must be ≥ 0, got {self.preflight_rows}.")
        if (
            not self.output_subdir
            or os.path.isabs(self.output_subdir)
            or ".." in Path(self.output_subdir).parts
        ):
            raise InputError(f"output_subdir must be a relative folder name, got {self.output_subdir!r}.")


class DataSelectionCallback(TrainerCallback):
    """Iterative kMQ as a Trainer callback (see the module docstring for the whole story).

    Args:
        config: a :class:`DataSelectionConfig`; or give its fields as keyword arguments.
        pool: the rows to select from, with text (and optionally ``cluster``/``embedding``/quality columns).
            Default: the trainer's ``train_dataset``.
        scorer: ``"reward"``, ``"perplexity"``, ``"loss"`` (as ``config.scorer``) or a callable
            ``fn(prompts, responses[, model=, tokenizer=]) -> floats``.
        formatter: ``fn(row) -> (prompt, response)`` when the pool's format is not auto-detected.
    """

    def __init__(
        self,
        config: DataSelectionConfig | None = None,
        *,
        pool: Dataset | None = None,
        scorer: str | Callable[..., Any] | None = None,
        formatter: Callable[..., tuple[str, str]] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(scorer, str):  # a built-in scorer's name is an option like any other
            options["scorer"], scorer = scorer, None
        if config is not None and options:
            raise InputError("Pass either config= or keyword options, not both.")
        if config is None:
            known = {f.name for f in dataclasses.fields(DataSelectionConfig)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise InputError(
                    f"DataSelectionCallback has no option(s) {unknown}; options are {sorted(known)}."
                )
            config = DataSelectionConfig(**options)
        config.validate()
        self.config = config
        self.pool = pool
        self.formatter = formatter
        self.scorer: Scorer = self._build_scorer(scorer)
        if scorer is not None:
            config.scorer = "callable"
        self.sampler: SelectionSampler | None = None
        self.engine: IterativeKMQ | None = None
        self.epoch_records: dict[int, dict[str, Any]] = {}
        self.timings: dict[int, dict[str, float]] = {}
        self._trainer: Trainer | None = None

    # -- set-up (before training) ------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> Trainer:
        """Connect the callback to ``trainer`` (the one extra line); checks everything cheap before training.

        Replaces the trainer's training sampler by the fixed-length selection sampler, adds the callback to the
        trainer if it is not there yet, and returns the trainer (so ``trainer = selection.attach(Trainer(...))``
        works too).
        """
        self._check_trainer(trainer)
        args = trainer.args
        self.seed = int(self.config.seed if self.config.seed is not None else args.seed)
        train_dataset = trainer.train_dataset
        pool = self.pool if self.pool is not None else train_dataset
        self._pool_is_train = self.pool is None or self.pool is train_dataset
        self._eos_suffix = self._trainer_eos_suffix(trainer) if self._pool_is_train else None
        self._pool = pool
        self.row_format = self._resolve_row_format(pool)
        self._check_texts(pool)
        self.train_positions = self._map_to_train(
            pool, train_dataset, shuffled=bool(getattr(args, "shuffle_dataset", False))
        )
        usable = int((self.train_positions >= 0).sum())
        from hf_dataselect.selection.base import resolve_budget

        self.budget = resolve_budget(self.config.budget_per_epoch, usable)
        if args.max_steps is None or args.max_steps <= 0:
            epochs = math.ceil(args.num_train_epochs)
            if epochs * self.budget > usable:
                raise InputError(
                    f"{epochs} epochs × {self.budget} rows per epoch = {epochs * self.budget} rows, but the pool "
                    f"has {usable}: every epoch trains on rows not trained before. Lower budget_per_epoch or "
                    "num_train_epochs."
                )
        self._check_columns(pool)
        self.sampler = SelectionSampler(self.budget, seed=self.seed, shuffle=self.config.shuffle)
        sampler = self.sampler

        def selection_sampler(train_dataset: Any = None) -> SelectionSampler:
            return sampler

        trainer._get_train_sampler = selection_sampler  # type: ignore[method-assign]
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        logger.info(
            "Data selection: %d rows per epoch from a pool of %d (scorer: %s).",
            self.budget,
            usable,
            describe_scorer(self.scorer)["name"],
        )
        return trainer

    def _build_scorer(self, scorer: Callable[..., Any] | None) -> Scorer:
        if scorer is not None:
            return make_scorer(scorer)
        options: dict[str, Any] = {
            "batch_size": self.config.scoring_batch_size,
            "max_length": self.config.max_length,
            "chat_template": self.config.chat_template,
        }
        if self.config.scorer in ("reward", "perplexity"):
            options["max_new_tokens"] = self.config.max_new_tokens
        if self.config.scorer == "reward":
            options["reward_model"] = self.config.reward_model
        elif self.config.reward_model is not None:
            raise InputError(f"reward_model is only used by scorer='reward', not {self.config.scorer!r}.")
        return make_scorer(self.config.scorer, **{**options, **self.config.scorer_options})

    def _check_trainer(self, trainer: Any) -> None:
        if not callable(getattr(trainer, "_get_train_sampler", None)) or not hasattr(
            trainer, "callback_handler"
        ):
            raise InputError("attach() needs a transformers.Trainer (or a subclass such as trl.SFTTrainer).")
        args = trainer.args
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy not in (None, "random") or getattr(args, "group_by_length", False):
            raise InputError(
                f"train_sampling_strategy={strategy!r} replaces the training sampler; DataSelectionCallback "
                "needs the default ('random')."
            )
        if getattr(args, "packing", False):
            raise InputError(
                "packing=True merges rows into blocks, so single rows cannot be selected per epoch; set "
                "packing=False (padding_free=True keeps most of its speed)."
            )
        dataset = trainer.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "column_names"):
            raise InputError(
                "DataSelectionCallback needs a map-style datasets.Dataset as the trainer's train_dataset "
                f"(got {type(dataset).__name__})."
            )

    def _trainer_eos_suffix(self, trainer: Any) -> str | None:
        """SFTTrainer appends the EOS text to non-chat completions; strip it when reading gold responses."""
        tokenizer = _tokenizer_of(trainer.processing_class)
        if tokenizer is None or "input_ids" not in trainer.train_dataset.column_names:
            return None
        return getattr(tokenizer, "eos_token", None) or None

    def _resolve_row_format(self, pool: Dataset) -> RowFormat:
        from hf_dataselect.formatting import RowFormat

        config = self.config
        row_format = RowFormat.resolve(
            pool.column_names,
            prompt_column=config.prompt_column,
            response_column=config.response_column,
            formatter=self.formatter,
            row_format=config.row_format,
        )
        if not row_format.has_response:
            raise InputError(
                f"Scoring needs a prompt and a gold response per row, but the pool's rows are read as "
                f"{row_format.kind!r} (columns {pool.column_names}). Use a messages / prompt-completion / "
                "instruction-output dataset, name the columns (prompt_column=, response_column=) or pass "
                "formatter=."
            )
        return row_format

    def _check_texts(self, pool: Dataset) -> None:
        from hf_dataselect.formatting import check_texts

        prompts, responses = self.texts(pool)
        check_texts(prompts, responses, need_response=True)
        empty_prompts = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty_prompts:
            raise InputError(
                f"{len(empty_prompts)} row(s) have no prompt, e.g. row position(s) {empty_prompts[:5]}; scoring "
                "asks the model to answer each prompt. Drop them first (dataset.filter)."
            )

    def texts(self, rows: Dataset) -> tuple[list[str], list[str]]:
        """(prompts, gold responses) of ``rows`` of the pool, as the scorers see them."""
        from hf_dataselect.data import pool_prompt_response

        prompts, responses = pool_prompt_response(rows, self.row_format)
        suffix = self._eos_suffix
        if suffix:
            responses = [r[: -len(suffix)] if r.endswith(suffix) else r for r in responses]
        return prompts, responses

    def _map_to_train(self, pool: Dataset, train_dataset: Dataset, *, shuffled: bool) -> np.ndarray:
        """Position in the trainer's dataset of every pool row (-1 when the trainer dropped it)."""
        from hf_dataselect.selection.result import ID_COLUMNS

        if self._pool_is_train:
            return np.arange(len(pool), dtype=np.int64)
        id_column = self.config.id_column
        if id_column is None:
            id_column = next(
                (c for c in ID_COLUMNS if c in pool.column_names and c in train_dataset.column_names), None
            )
        elif id_column not in pool.column_names or id_column not in train_dataset.column_names:
            raise InputError(
                f"id_column {id_column!r} must be a column of both the pool ({pool.column_names}) and the "
                f"trainer's dataset ({train_dataset.column_names})."
            )
        if id_column is None:
            if len(pool) == len(train_dataset) and not shuffled:
                logger.info(
                    "No shared id column: pool row i is the trainer's row i (same length, same order)."
                )
                return np.arange(len(pool), dtype=np.int64)
            raise InputError(
                f"The pool has {len(pool)} rows and the trainer's dataset {len(train_dataset)} (the trainer may "
                "have dropped or shuffled rows), and they share no id column. Add one before building the "
                "trainer, e.g. ds = ds.add_column('row_id', list(range(len(ds)))), or leave pool=None."
            )
        pool_ids = pool.with_format(None)[id_column]
        train_ids = train_dataset.with_format(None)[id_column]
        index: dict[Any, int] = {}
        for position, value in enumerate(train_ids):
            if value in index:
                raise InputError(
                    f"id_column {id_column!r} has the duplicate id {value!r} in the trainer's dataset."
                )
            index[value] = position
        if len(set(pool_ids)) != len(pool_ids):
            raise InputError(f"id_column {id_column!r} has duplicate ids in the pool.")
        mapping = np.array([index.get(value, -1) for value in pool_ids], dtype=np.int64)
        dropped = int((mapping < 0).sum())
        if dropped:
            logger.info("%d pool rows are not in the trainer's dataset (dropped by preprocessing).", dropped)
        if dropped == len(pool):
            raise InputError(f"No pool row's {id_column!r} appears in the trainer's dataset.")
        return mapping

    def _check_columns(self, pool: Dataset) -> None:
        from hf_dataselect.data import numeric_column
        from hf_dataselect.selection.columns import check_k

        config = self.config
        if config.quality_column is not None:
            numeric_column(pool, config.quality_column, purpose="iterative kMQ quality weighting")
        if config.cluster_column in pool.column_names:
            from hf_dataselect.selection.columns import cluster_labels

            cluster_labels(pool, config.cluster_column)
        else:
            check_k(config.k, len(pool))

    # -- callback events --------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        trainer = self._trainer
        if trainer is None or self.sampler is None:
            raise InputError(
                "DataSelectionCallback is not attached: call selection.attach(trainer) before trainer.train()."
            )
        if _find_sampler(kwargs.get("train_dataloader")) is not self.sampler:
            raise InputError(
                "The training dataloader does not use the selection sampler; was attach() called on this trainer "
                "before train()?"
            )
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if self.config.preflight_rows and not saved:
            self._preflight(kwargs["model"])
        started = time.perf_counter()
        rounds = int(state.num_train_epochs)
        labels, clustering = self._clusters(saved)
        quality = None
        if self.config.quality_column is not None:
            from hf_dataselect.data import numeric_column

            quality = numeric_column(self._pool, self.config.quality_column, purpose="iterative kMQ quality")
        self.engine = IterativeKMQ(
            labels,
            self.budget,
            rounds=rounds,
            temperature=self.config.temperature,
            quality=quality,
            quality_temperature=self.config.quality_temperature,
            allocation=self.config.allocation,
            seed=self.seed,
            exclude=self.train_positions < 0,
        )
        self.clustering = clustering
        self.epoch_records = {}
        if saved:
            self._restore(saved)
        self._epoch = math.floor(float(state.epoch) + 1e-9)
        if self._is_main:
            self._write_json("config.json", self._config_record(rounds))
            self._write_json("clusters.json", {**clustering, "labels": labels.tolist()})
            # resumed into another output_dir: record the replayed rounds (their per-row scores stay in the
            # checkpoint's copy of the folder)
            for record in self.engine.history:
                if not (self.output_folder / f"epoch-{record.index:03d}.json").exists():
                    self._record_epoch(record.index)
        self._store_state(state)
        self.setup_seconds = time.perf_counter() - started

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        assert self.engine is not None and self.sampler is not None
        epoch = self._epoch
        engine = self.engine
        if epoch >= 1 and engine.rounds_done == epoch and engine.history[epoch - 1].weights_after is None:
            # resumed from a checkpoint saved after the last step of the epoch but before its scoring
            self._score_round(epoch - 1, kwargs["model"], state)
        started = time.perf_counter()
        if engine.rounds_done == epoch:
            engine.select()
        elif engine.rounds_done != epoch + 1:
            raise RuntimeError(f"Epoch {epoch} begins but {engine.rounds_done} rounds are selected.")
        positions = engine.history[epoch].positions
        self.sampler.set_rows(epoch, self.train_positions[positions])
        self._store_state(state)
        self.timings.setdefault(epoch, {})["selection_seconds"] = time.perf_counter() - started
        self._record_epoch(epoch)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        assert self.engine is not None
        epoch = self._epoch
        last = epoch + 1 >= self.engine.rounds
        if (not last or self.config.score_last_epoch) and self.engine.history[epoch].weights_after is None:
            self._score_round(epoch, kwargs["model"], state)
        self._epoch += 1

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not self._is_main or not args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        source = self.output_folder
        if checkpoint.is_dir() and source.is_dir():
            with atomic.staging_folder(checkpoint / self.config.output_subdir) as staging:
                for item in source.glob("*.json"):
                    shutil.copy2(item, staging / item.name)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        if self.engine is None or not self._is_main:
            return
        self._write_json("selection.json", self.summary())

    # -- rounds ---------------------------------------------------------------------------------------------
    def _clusters(self, saved: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
        """Cluster id of every pool row: from the cluster column, or k-means on the main process (broadcast).

        When resuming, the labels written by the interrupted run are reused if they match the checkpoint's
        digest, so a resumed run does not depend on k-means being bit-for-bit repeatable.
        """
        config = self.config
        pool = self._pool
        if config.cluster_column in pool.column_names:
            from hf_dataselect.selection.columns import cluster_labels

            labels = cluster_labels(pool, config.cluster_column)
            return labels, {"source": f"column {config.cluster_column!r}", "k": int(labels.max()) + 1}
        result: list[Any] = [None]
        if self._is_main:
            try:
                reused = self._saved_clusters(saved)
                result[0] = ("ok", *(reused if reused is not None else self._fit_clusters()))
            except Exception as err:  # tell the other ranks, which are waiting for the labels
                if self._num_processes == 1:
                    raise
                result[0] = ("error", f"{type(err).__name__}: {err}", None)
        if self._num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(result)
        status, labels, metadata = result[0]
        if status == "error":
            raise InputError(f"Clustering the selection pool failed on the main process: {labels}")
        return labels, metadata

    def _saved_clusters(self, saved: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]] | None:
        path = self.output_folder / "clusters.json"
        if not saved or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = np.asarray(data.pop("labels", []), dtype=np.int64)
        if len(labels) != len(self._pool):
            return None
        if positions_digest(labels) != saved["engine"]["config"].get("clusters_digest"):
            return None
        logger.info("Data selection: reusing the clusters of the interrupted run (%s).", path)
        return labels, data

    def _fit_clusters(self) -> tuple[np.ndarray, dict[str, Any]]:
        from hf_dataselect.data import matrix_column
        from hf_dataselect.selection.columns import cluster_pool

        config = self.config
        pool = self._pool
        if config.embedding_column not in pool.column_names:
            from hf_dataselect.transforms.embed import Embeddings

            logger.info("Data selection: embedding %d pool rows to cluster them.", len(pool))
            row_format = self.row_format
            transform = Embeddings(
                model=config.embedding_model,
                text=config.embedding_text,
                column=config.embedding_column,
                prompt_column=row_format.prompt_column if row_format.kind == "columns" else None,
                response_column=row_format.response_column if row_format.kind == "columns" else None,
                formatter=row_format.formatter,
            )
            pool = pool.map(transform, batched=True, batch_size=1000, desc="Embedding the selection pool")
        kmeans = cluster_pool(
            matrix_column(pool, config.embedding_column),
            k=config.k,
            k_grid=config.k_grid,
            seed=self.seed,
            backend=config.kmeans_backend,
            niter=config.kmeans_niter,
            max_points_per_centroid=None,
            silhouette_sample_size=10_000,
        )
        assert kmeans.labels is not None
        return kmeans.labels, {"source": f"k-means on {config.embedding_column!r}", **kmeans.metadata()}

    def _preflight(self, model: Any) -> None:
        """Score a couple of rows before the first step so that a broken scorer fails early."""
        candidates = np.flatnonzero(self.train_positions >= 0)[: self.config.preflight_rows]
        try:
            columns = self._run_scorer(candidates, model)
            check_scores(columns, len(candidates))
        except InputError as err:
            raise InputError(f"The scorer failed its trial run before training: {err}") from err

    def _run_scorer(self, positions: np.ndarray, model: Any) -> dict[str, np.ndarray]:
        prompts, responses = self.texts(self._pool.select(positions.tolist()))
        trainer = self._trainer
        assert trainer is not None
        tokenizer = _tokenizer_of(trainer.processing_class)
        with trainer.accelerator.autocast():  # the training run's mixed precision, if any
            return self.scorer(prompts, responses, model=model, tokenizer=tokenizer)

    def _score_round(self, epoch: int, model: Any, state: TrainerState) -> None:
        """Score the rows of ``epoch`` across processes, gather, and update the cluster weights."""
        assert self.engine is not None
        started = time.perf_counter()
        record = self.engine.history[epoch]
        positions = record.positions
        if self.config.score_rows is not None and self.config.score_rows < len(positions):
            rng = np.random.default_rng([self.seed, epoch, 11])
            positions = np.sort(rng.choice(positions, size=self.config.score_rows, replace=False))
        mine = positions[self._process_index :: self._num_processes]
        outcome: Any
        try:
            columns = self._run_scorer(mine, model) if len(mine) else {"score": np.zeros(0)}
            outcome = (
                "ok",
                mine.tolist(),
                {k: np.asarray(v, dtype=np.float64).tolist() for k, v in columns.items()},
            )
            if len(columns["score"]) != len(mine):
                outcome = (
                    "error",
                    f"The scorer returned {len(columns['score'])} scores for {len(mine)} rows.",
                )
        except Exception as err:  # every rank must learn about a failure, or the others wait forever
            if self._num_processes == 1:
                raise
            outcome = ("error", f"{type(err).__name__}: {err}")
        gathered = [outcome]
        if self._num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([outcome])
        errors = [item[1] for item in gathered if item[0] == "error"]
        if errors:
            raise InputError(f"Scoring the rows of epoch {epoch} failed: {errors[0]}")
        rows: list[int] = []
        details: dict[str, list[float]] = {}
        for _, part_rows, part_columns in gathered:
            rows.extend(part_rows)
            for name, values in part_columns.items():
                details.setdefault(name, []).extend(values)
        try:
            scores = check_scores({"score": np.asarray(details["score"])}, len(rows))
        except InputError as err:
            raise InputError(f"Scoring the rows of epoch {epoch}: {err}") from err
        order = np.argsort(np.asarray(rows), kind="stable")
        rows_sorted = np.asarray(rows, dtype=np.int64)[order]
        self.engine.update(dict(zip(rows_sorted.tolist(), scores[order].tolist(), strict=True)))
        self.epoch_records.setdefault(epoch, {})["score_details"] = {
            name: {str(r): v for r, v in zip(rows, values, strict=True)} for name, values in details.items()
        }
        self.timings.setdefault(epoch, {})["scoring_seconds"] = time.perf_counter() - started
        self._store_state(state)
        self._record_epoch(epoch)

    def _restore(self, saved: dict[str, Any]) -> None:
        assert self.engine is not None
        if saved.get("version") != STATE_VERSION:
            raise InputError(f"Unknown DataSelectionCallback state version {saved.get('version')!r}.")
        if saved.get("budget") != self.budget or saved.get("seed") != self.seed:
            raise InputError(
                f"The checkpoint's data selection used budget {saved.get('budget')} and seed {saved.get('seed')}; "
                f"this run uses {self.budget} and {self.seed}."
            )
        self.engine.load_state_dict(saved["engine"])
        logger.info("Data selection: restored %d round(s) from the checkpoint.", self.engine.rounds_done)

    def _store_state(self, state: TrainerState) -> None:
        assert self.engine is not None
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = {
            "version": STATE_VERSION,
            "budget": self.budget,
            "seed": self.seed,
            "engine": self.engine.state_dict(),
        }

    # -- records ----------------------------------------------------------------------------------------------
    @property
    def selections(self) -> list[np.ndarray]:
        """Pool positions trained in each epoch so far."""
        return [] if self.engine is None else [r.positions for r in self.engine.history]

    @property
    def weights(self) -> np.ndarray | None:
        """Current cluster weights."""
        return None if self.engine is None else self.engine.weights

    def _record_epoch(self, epoch: int) -> None:
        assert self.engine is not None
        record = self.engine.history[epoch]
        data = record.as_dict(self.engine.clusters)
        data.pop("round")
        data = {
            "epoch": epoch,
            "rows": len(record.positions),
            "positions_digest": positions_digest(record.positions),
            **data,
            "train_positions": self.train_positions[record.positions].tolist(),
        }
        row_ids = self._row_ids(record.positions)
        if row_ids is not None:
            data["row_ids"] = row_ids
        extra = self.epoch_records.get(epoch, {})
        if "score_details" in extra:
            data["score_details"] = {
                name: [values.get(str(p)) for p in record.positions.tolist()]
                for name, values in extra["score_details"].items()
                if name != "score"
            }
        data["scorer"] = describe_scorer(self.scorer)
        data["timing"] = self.timings.get(epoch, {})
        if self._is_main:
            self._write_json(f"epoch-{epoch:03d}.json", data)

    def _row_ids(self, positions: np.ndarray) -> list[Any] | None:
        from hf_dataselect.selection.result import ID_COLUMNS

        column = self.config.id_column or next((c for c in ID_COLUMNS if c in self._pool.column_names), None)
        if column is None or column not in self._pool.column_names:
            return None
        return list(self._pool.select(positions.tolist()).with_format(None)[column])

    def summary(self) -> dict[str, Any]:
        """Every epoch's positions, cluster weights and digests (what ``selection.json`` holds)."""
        assert self.engine is not None
        return {
            "library": "hf_dataselect",
            "budget_per_epoch": self.budget,
            "seed": self.seed,
            "epochs": [
                {
                    "epoch": r.index,
                    "positions": r.positions.tolist(),
                    "positions_digest": positions_digest(r.positions),
                    "weights": r.weights.tolist(),
                    "weights_after": None if r.weights_after is None else r.weights_after.tolist(),
                }
                for r in self.engine.history
            ],
            "final_weights": self.engine.weights.tolist(),
        }

    def _config_record(self, rounds: int) -> dict[str, Any]:
        from hf_dataselect import __version__

        assert self.engine is not None
        return {
            "library": "hf_dataselect",
            "library_version": __version__,
            "config": dataclasses.asdict(self.config),
            "scorer": describe_scorer(self.scorer),
            "seed": self.seed,
            "budget_per_epoch": self.budget,
            "epochs": rounds,
            "pool_rows": len(self._pool),
            "pool_rows_in_trainer": int((self.train_positions >= 0).sum()),
            "pool_fingerprint": getattr(self._pool, "_fingerprint", None),
            "row_format": self.row_format.describe(),
            "clustering": {k: v for k, v in self.clustering.items() if k != "labels"},
            "cluster_sizes": self.engine.sizes.tolist(),
            "processes": self._num_processes,
        }

    @property
    def output_folder(self) -> Path:
        assert self._trainer is not None
        return Path(self._trainer.args.output_dir) / self.config.output_subdir

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic.write_json(self.output_folder / name, data, indent=1, default=_json_default)

    # -- processes ------------------------------------------------------------------------------------------
    @property
    def _num_processes(self) -> int:
        return int(self._trainer.accelerator.num_processes) if self._trainer is not None else 1

    @property
    def _process_index(self) -> int:
        return int(self._trainer.accelerator.process_index) if self._trainer is not None else 0

    @property
    def _is_main(self) -> bool:
        return self._process_index == 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def _tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer of a trainer's ``processing_class`` (a processor holds it as ``.tokenizer``)."""
    if processing_class is None:
        return None
    if (
        hasattr(processing_class, "apply_chat_template")
        and hasattr(processing_class, "batch_decode")
        and not hasattr(processing_class, "image_processor")
    ):
        return processing_class
    return getattr(processing_class, "tokenizer", processing_class)


def _find_sampler(dataloader: Any) -> Any:
    """The index sampler under accelerate's wrappers (``BatchSamplerShard`` → ``BatchSampler`` → sampler)."""
    if dataloader is None:
        return None
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for _ in range(4):
        if batch_sampler is None:
            return None
        sampler = getattr(batch_sampler, "sampler", None)
        if isinstance(sampler, SelectionSampler):
            return sampler
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return None
