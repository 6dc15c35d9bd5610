"""Running a recipe: every cell of its grid through the stages select, train and evaluate."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect import atomic
from hf_dataselect.commands._parser import parse_budget
from hf_dataselect.errors import InputError
from hf_dataselect.recipes.output import prepare_output
from hf_dataselect.recipes.recipe import Recipe, RunSpec
from hf_dataselect.recipes.summary import write_summary
from hf_dataselect.recipes.training_setup import (
    load_model_for_training,
    resolve_model_path,
    sft_examples,
    uses_chat_template,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dataselect.evaluation import EvalSet
    from hf_dataselect.selection.result import SelectionResult

logger = logging.getLogger("hf_dataselect.recipes")


@dataclass
class RunOutcome:
    """What one grid cell produced (paths are inside the run's folder)."""

    spec: RunSpec
    folder: Path
    rows: int | None = None
    selection_seconds: float | None = None
    train_seconds: float | None = None
    train_loss: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Eval set name -> ``HeldOutLoss.to_dict()``."""

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary_row(), "evaluation": self.evaluation}

    @classmethod
    def from_dict(cls, spec: RunSpec, folder: Path, data: dict[str, Any]) -> RunOutcome:
        return cls(
            spec,
            folder,
            rows=data.get("rows"),
            selection_seconds=data.get("selection_seconds"),
            train_seconds=data.get("train_seconds"),
            train_loss=data.get("train_loss"),
            evaluation=data.get("evaluation") or {},
        )

    def summary_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "run": self.spec.name,
            "method": self.spec.method,
            "budget": self.spec.budget,
            "seed": self.spec.seed,
            "rows": self.rows,
            "selection_seconds": self.selection_seconds,
            "train_seconds": self.train_seconds,
            "train_loss": self.train_loss,
        }
        for name, result in self.evaluation.items():
            row[f"{name}_macro_loss"] = result["macro_loss"]
            row[f"{name}_overall_loss"] = result["overall_loss"]
        return row


class _Pipeline:
    """Runs the stages of one recipe; state shared between grid cells (pool, features, eval sets, model)."""

    def __init__(self, recipe: Recipe, out: Path) -> None:
        self.recipe = recipe
        self.out = out
        self.timings: dict[str, float] = {}
        self._pool: Dataset | None = None
        self._featured: set[str] = set()
        self._eval_sets: list[EvalSet] = []

    # pool, held-out split, quality scores ---------------------------------------------------------------
    def pool(self) -> Dataset:
        if self._pool is None:
            started = time.perf_counter()
            pool = self.recipe.pool.load()
            logger.info("Pool: %s (%d rows).", self.recipe.pool.describe(), len(pool))
            pool, heldout = self._split_holdout(pool)
            self._load_eval_sets(heldout)
            if self.recipe.quality.scorer is not None and self.recipe.quality.column not in pool.column_names:
                pool = self._score_quality(pool)
            self._pool = pool
            self.timings["load_pool"] = time.perf_counter() - started
        return self._pool

    @property
    def eval_sets(self) -> list[EvalSet]:
        """The evaluation sets (loading the pool splits off its held-out rows)."""
        if self.recipe.evaluation.enabled:
            self.pool()
        return self._eval_sets

    def _split_holdout(self, pool: Dataset) -> tuple[Dataset, Dataset | None]:
        import numpy as np

        from hf_dataselect.selection.base import resolve_budget

        evaluation = self.recipe.evaluation
        if evaluation.holdout is None:
            return pool, None
        count = resolve_budget(parse_budget(evaluation.holdout), len(pool))
        if count >= len(pool):
            raise InputError(f"evaluation.holdout {evaluation.holdout} leaves no pool rows to select from.")
        order = np.random.default_rng([evaluation.holdout_seed, 7919]).permutation(len(pool))
        heldout = np.sort(order[:count])
        kept = np.sort(order[count:])
        logger.info("Held out %d pool rows for evaluation (seed %d).", count, evaluation.holdout_seed)
        return pool.select(kept), pool.select(heldout)

    def _load_eval_sets(self, heldout: Dataset | None) -> None:
        from hf_dataselect.data import load_pool
        from hf_dataselect.evaluation import EvalSet

        evaluation = self.recipe.evaluation
        sources: list[tuple[str, Dataset]] = []
        if heldout is not None:
            sources.append(("heldout", heldout))
        if evaluation.eval_data is not None:
            sources.append(("eval_data", load_pool(evaluation.eval_data, split=evaluation.eval_split)))
        kwargs = self.recipe.pool.select_kwargs()
        for name, dataset in sources:
            if evaluation.max_eval_rows is not None and len(dataset) > evaluation.max_eval_rows:
                dataset = dataset.select(range(evaluation.max_eval_rows))
            eval_set = EvalSet.from_dataset(
                dataset,
                label_column=evaluation.label_column,
                name=name,
                prompt_column=kwargs["prompt_column"],
                response_column=kwargs["response_column"],
            )
            self._eval_sets.append(eval_set)
            path = self.out / "eval" / f"{name}.jsonl"
            if not path.is_file():
                rows = [
                    {"prompt": p, "response": r, **({"label": lab} if eval_set.labels else {})}
                    for p, r, lab in zip(
                        eval_set.prompts,
                        eval_set.responses,
                        eval_set.labels or [None] * len(eval_set),
                        strict=True,
                    )
                ]
                atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def _score_quality(self, pool: Dataset) -> Dataset:
        """Add the quality column: reward-model score, or minus the response's mean NLL (log perplexity)."""
        import numpy as np

        from hf_dataselect.transforms.quality import PerplexityScores, RewardScores

        quality = self.recipe.quality
        started = time.perf_counter()
        kwargs = self.recipe.pool.select_kwargs()
        options = {
            "model": resolve_model_path(quality.model),
            "batch_size": quality.batch_size,
            "max_length": quality.max_length,
            "prompt_column": kwargs["prompt_column"],
            "response_column": kwargs["response_column"],
        }
        if quality.scorer == "reward":
            pool = pool.map(
                RewardScores(**options, column=quality.column), batched=True, desc="Reward scores"
            )
        else:
            scored = pool.map(
                PerplexityScores(**options, column="_perplexity"), batched=True, desc="Perplexity"
            )
            log_ppl = np.log(np.asarray(scored["_perplexity"], dtype=np.float64))
            pool = pool.add_column(quality.column, (-log_ppl).tolist())
        self.timings["quality"] = time.perf_counter() - started
        logger.info(
            "Scored %d rows with %s (%s) in %.1f s.",
            len(pool),
            quality.model,
            quality.scorer,
            self.timings["quality"],
        )
        return pool

    def check_pending(self, specs: Sequence[RunSpec]) -> None:
        """Validate every selection still to make against the pool, before any feature is computed."""
        from hf_dataselect.selection.base import SelectionContext, make_selector, resolve_budget

        pending = [
            s
            for s in specs
            if not self.recipe.uses_callback(s.method)
            and not (self.out / s.name / "selection" / "manifest.json").is_file()
        ]
        if not pending:
            return
        pool = self.pool()
        kwargs = self.recipe.pool.select_kwargs()
        for spec in pending:
            selector = make_selector(spec.method, self.recipe.method_options(spec.method))
            context = SelectionContext(
                seed=spec.seed,
                column_names=list(pool.column_names),
                prompt_column=kwargs["prompt_column"],
                response_column=kwargs["response_column"],
            )
            try:
                selector.validate(pool, resolve_budget(parse_budget(spec.budget), len(pool)), context)
            except InputError as err:
                raise InputError(f"{spec.name}: {err}") from err

    # features ------------------------------------------------------------------------------------------
    def featured_pool(self, method: str) -> Dataset:
        """The pool with the columns ``method`` needs, computed once and shared by the whole grid."""
        from hf_dataselect.selection.base import SelectionContext, make_selector

        pool = self.pool()
        if method in self._featured:
            return pool
        started = time.perf_counter()
        selector = make_selector(method, self.recipe.method_options(method))
        kwargs = self.recipe.pool.select_kwargs()
        context = SelectionContext(
            seed=self.recipe.seeds()[0],
            column_names=list(pool.column_names),
            prompt_column=kwargs["prompt_column"],
            response_column=kwargs["response_column"],
        )
        before = set(pool.column_names)
        pool = selector.prepare(pool, context)
        added = sorted(set(pool.column_names) - before)
        if added:
            logger.info("Features for %s: added %s in %.1f s.", method, added, time.perf_counter() - started)
            self.timings[f"features:{method}"] = time.perf_counter() - started
        self._pool = pool
        self._featured.add(method)
        return pool

    # stages ---------------------------------------------------------------------------------------------
    def select(self, spec: RunSpec, folder: Path) -> tuple[Dataset | None, RunOutcome]:
        import datasets

        from hf_dataselect.selection import select

        outcome = RunOutcome(spec, folder)
        if self.recipe.uses_callback(spec.method):
            return None, outcome  # DataSelectionCallback selects epoch by epoch during training
        target = folder / "selection"
        if (target / "manifest.json").is_file():
            manifest = json.loads((target / "manifest.json").read_text())
            outcome.rows = int(manifest["budget"])
            outcome.selection_seconds = manifest["summary"].get("seconds")
            logger.info("%s: reusing the saved selection.", spec.name)
            return datasets.load_from_disk(str(target / "selected")), outcome
        if not self.recipe.wants("select"):
            raise InputError(
                f"{spec.name}: no saved selection in {target} and 'select' is not in run.stages."
            )
        pool = self.featured_pool(spec.method)
        result: SelectionResult = select(
            pool,
            spec.method,
            parse_budget(spec.budget),
            seed=spec.seed,
            **self.recipe.pool.select_kwargs(),
            **self.recipe.method_options(spec.method),
        )
        result.save(target, overwrite=True, figures=self.recipe.run.figures)
        outcome.rows = len(result)
        outcome.selection_seconds = result.elapsed_seconds
        return result.dataset, outcome

    def train(self, spec: RunSpec, folder: Path, selected: Dataset, outcome: RunOutcome):
        """Fine-tune on the selected rows; returns ``(model, tokenizer)`` (or ``None`` if not trained)."""
        model_folder = folder / "model"
        if (model_folder / "config.json").is_file():
            logger.info("%s: reusing the fine-tuned model.", spec.name)
            log = folder / "training_log.json"
            if log.is_file():
                outcome.train_loss, outcome.train_seconds = _final_train_metrics(json.loads(log.read_text()))
            return None
        if not self.recipe.wants("train"):
            return None
        from trl import SFTTrainer

        from hf_dataselect.evaluation import HeldOutLossCallback

        model, tokenizer, peft_config = load_model_for_training(self.recipe.model, self.recipe.training)
        conversational = uses_chat_template(tokenizer, self.recipe.training)
        training_dir = folder / "training"
        args = self.recipe.sft_config(training_dir)
        callbacks: list[Any] = []
        if self.recipe.evaluation.epochs and self.eval_sets:
            callbacks.append(
                HeldOutLossCallback(
                    self.eval_sets,
                    tokenizer,
                    epochs=self.recipe.evaluation.epochs,
                    log_file=training_dir / "heldout_loss.jsonl",
                    batch_size=self.recipe.evaluation.batch_size,
                    max_length=self.recipe.evaluation.max_length,
                    chat_template=conversational,
                )
            )
        selection = None
        if selected is None:  # iterative kMQ: the whole pool goes to the trainer, the callback picks the rows
            train_dataset, selection = self._callback_training_data(spec, args, conversational)
            outcome.rows = selection.config.budget_per_epoch * math.ceil(args.num_train_epochs)
        else:
            train_dataset = self._sft_data(selected, conversational)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        if selection is not None:
            selection.attach(trainer)
        resume = _last_checkpoint(training_dir)
        if resume:
            logger.info("%s: resuming training from %s.", spec.name, resume)
        train_output = trainer.train(resume_from_checkpoint=resume)
        # every process takes part in saving (FSDP / ZeRO-3 gather the weights); the main one writes and renames
        staging = folder / ".model.partial"
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(staging))
            atomic.replace_folder(staging, model_folder)
            atomic.write_json(folder / "training_log.json", trainer.state.log_history, default=str)
        trainer.accelerator.wait_for_everyone()
        outcome.train_loss = float(train_output.training_loss)
        outcome.train_seconds = float(train_output.metrics.get("train_runtime", 0.0))
        if trainer.accelerator.num_processes > 1:
            return None  # a sharded model is evaluated from the saved folder, in one process
        return trainer.model, tokenizer

    def _sft_data(self, rows: Dataset, conversational: bool) -> Dataset:
        kwargs = self.recipe.pool.select_kwargs()
        return sft_examples(
            rows,
            conversational=conversational,
            prompt_column=kwargs["prompt_column"],
            response_column=kwargs["response_column"],
        )

    def _callback_training_data(self, spec: RunSpec, args: Any, conversational: bool):
        """The pool as SFT examples (with its embeddings and quality columns) and the configured callback."""
        from hf_dataselect.selection.base import resolve_budget
        from hf_dataselect.training.callback import DataSelectionCallback

        pool = self.featured_pool(spec.method)  # embeddings, so the callback does not recompute them
        epochs = math.ceil(args.num_train_epochs)
        budget = resolve_budget(parse_budget(spec.budget), len(pool))
        if budget < epochs:
            raise InputError(f"{spec.name}: budget {budget} is smaller than the number of epochs ({epochs}).")
        config = self.recipe.data_selection_config(budget_per_epoch=budget // epochs, seed=spec.seed)
        if config.reward_model is not None:
            config.reward_model = resolve_model_path(config.reward_model)
        data = self._sft_data(pool, conversational)
        carried = [config.embedding_column, config.cluster_column, config.quality_column]
        for column in dict.fromkeys(c for c in carried if c and c in pool.column_names):
            data = data.add_column(column, pool[column])
        logger.info(
            "%s: DataSelectionCallback picks %d rows per epoch for %d epochs from %d rows.",
            spec.name,
            config.budget_per_epoch,
            epochs,
            len(pool),
        )
        return data, DataSelectionCallback(config)

    def evaluate(self, spec: RunSpec, folder: Path, trained, outcome: RunOutcome) -> None:
        path = folder / "evaluation.json"
        if path.is_file():
            outcome.evaluation = json.loads(path.read_text())["eval_sets"]
            return
        if not (self.recipe.wants("evaluate") and self.recipe.evaluation.enabled):
            return
        if trained is None:
            if not (folder / "model" / "config.json").is_file():
                return  # nothing trained to evaluate
            trained = self._load_trained(folder / "model")
        model, tokenizer = trained
        outcome.evaluation = self._evaluate_model(model, tokenizer)
        atomic.write_json(path, {"run": spec.name, "eval_sets": outcome.evaluation}, default=str)

    def evaluate_base_model(self) -> dict[str, Any] | None:
        if not (self.recipe.evaluation.evaluate_base_model and self.recipe.wants("evaluate")):
            return None
        path = self.out / "base_model_evaluation.json"
        if path.is_file():
            return json.loads(path.read_text())["eval_sets"]
        if not self.eval_sets:
            return None
        model, tokenizer, _ = load_model_for_training(self.recipe.model, self.recipe.training)
        results = self._evaluate_model(model, tokenizer)
        atomic.write_json(
            path, {"model": self.recipe.model.model_name_or_path, "eval_sets": results}, default=str
        )
        return results

    def _evaluate_model(self, model, tokenizer) -> dict[str, Any]:
        from hf_dataselect.evaluation import heldout_loss

        conversational = uses_chat_template(tokenizer, self.recipe.training)
        results = {}
        for eval_set in self.eval_sets:
            result = heldout_loss(
                model,
                tokenizer,
                eval_set,
                batch_size=self.recipe.evaluation.batch_size,
                max_length=self.recipe.evaluation.max_length,
                chat_template=conversational,
            )
            results[eval_set.name] = result.to_dict()
            logger.info(
                "%s: macro loss %.4f over %d labels.", eval_set.name, result.macro, len(result.labels)
            )
        return results

    def _load_trained(self, folder: Path):
        from hf_dataselect.models import load_model, load_tokenizer

        return load_model(str(folder), kind="causal-lm"), load_tokenizer(str(folder))


def _saved_outcome(spec: RunSpec, folder: Path, stages: Sequence[str]) -> RunOutcome | None:
    """The outcome of a run that already completed every requested stage (``outcome.json``), else ``None``."""
    path = folder / "outcome.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not set(stages) <= set(data.get("stages", [])):
        return None
    logger.info("%s: done in an earlier run.", spec.name)
    return RunOutcome.from_dict(spec, folder, data)


def _last_checkpoint(training_dir: Path) -> str | None:
    if not training_dir.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(training_dir))


def _final_train_metrics(log_history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    for entry in reversed(log_history):
        if "train_loss" in entry:
            return float(entry["train_loss"]), float(entry.get("train_runtime", 0.0))
    return None, None


def run_recipe(recipe: Recipe) -> list[RunOutcome]:
    """Run every cell of the recipe's grid; see the module docstring for what is written where."""
    from accelerate import PartialState

    state = PartialState()
    started = time.perf_counter()
    with state.main_process_first():
        out = prepare_output(recipe) if state.is_main_process else Path(recipe.run.output_dir)
    pipeline = _Pipeline(recipe, out)
    status: dict[str, Any] = {
        "recipe": recipe.source,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "status": "running",
    }
    if state.is_main_process:
        atomic.write_json(out / "run.json", status, default=str)
    outcomes: list[RunOutcome] = []
    try:
        if state.is_main_process and recipe.wants("select"):
            pipeline.check_pending(recipe.runs())  # bad options fail before features are computed
        base = pipeline.evaluate_base_model() if state.is_main_process else None
        for spec in recipe.runs():
            folder = out / spec.name
            done = _saved_outcome(spec, folder, recipe.run.stages)
            if done is not None:
                outcomes.append(done)
                continue
            with state.main_process_first():  # the main process selects; the others reuse its saved selection
                selected, outcome = pipeline.select(spec, folder)
            trained = pipeline.train(spec, folder, selected, outcome)
            if state.is_main_process:
                pipeline.evaluate(spec, folder, trained, outcome)
                atomic.write_json(
                    folder / "outcome.json", {"stages": recipe.run.stages, **outcome.to_dict()}, default=str
                )
            outcomes.append(outcome)
        status.update(status="done")
    except BaseException as err:
        status.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        status.update(seconds=round(time.perf_counter() - started, 1), stages=pipeline.timings)
        if state.is_main_process:
            atomic.write_json(out / "run.json", status, default=str)
    if state.is_main_process:
        write_summary(out, outcomes, base)
    return outcomes


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    from hf_dataselect import __version__

    versions = {"hf_dataselect": __version__}
    for package in ("torch", "transformers", "trl", "datasets", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
