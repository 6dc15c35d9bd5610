"""YAML recipes: load a pool → compute features → select → fine-tune (optional) → evaluate, in one folder.

A recipe is a YAML file with one mapping per section; every section is parsed into an existing dataclass by
:class:`transformers.HfArgumentParser`, the way TRL and the alignment handbook read their recipes:

=============  ==============================================================================================
``pool``       :class:`hf_dataselect.commands._pool.PoolArguments` (the same flags as ``hf-dataselect select``)
``selection``  :class:`hf_dataselect.commands.select.SelectArguments` (method, budget, seed, method options)
``quality``    :class:`QualityArguments`: score every row with a reward model or an LM before selecting
``iterative``  the fields of :class:`hf_dataselect.training.DataSelectionConfig`: iterative kMQ in training
``model``      :class:`trl.ModelConfig`: the model to fine-tune (LoRA / quantisation options included)
``training``   :class:`trl.SFTConfig`: every ``SFTTrainer`` argument (``output_dir`` is set by the recipe)
``evaluation`` :class:`EvaluationArguments`: held-out rows, per-label loss, epochs to evaluate at
``run``        :class:`RunArguments`: output folder, the grid of methods × budgets × seeds, stages to run
=============  ==============================================================================================

Any field can be overridden on the command line as ``--section.field value`` (``hf-dataselect run R.yaml
--selection.budget 3000 --training.learning_rate 1e-5``). Unknown sections or fields are errors that name the
closest valid spelling.

Everything a run produces goes to ``run.output_dir``::

    recipe.yaml                  the resolved recipe (overrides applied); a re-run with the same recipe resumes
    run.json                     stages, timings, versions, status
    eval/<name>.jsonl            the held-out evaluation rows (never selected, never trained on)
    base_model_evaluation.json   the untrained model on the evaluation sets (when asked)
    <method>-<budget>-seed<seed>/
        selection/               SelectionResult.save: selected rows, manifest.json, figures
        training/                SFTTrainer output_dir: checkpoints, trainer_state.json, heldout_loss.jsonl
        model/                   the fine-tuned model + tokenizer (written when training finished)
        training_log.json        the trainer's log history
        evaluation.json          held-out loss per label, macro and overall
    summary.json, summary.md     one row per run

Stages already completed (a ``selection/`` folder, a ``model/`` folder, an ``evaluation.json``) are reused, so an
interrupted run continues where it stopped; an interrupted training resumes from its last checkpoint.

A grid (``run.methods`` × ``run.budgets`` × ``run.seeds``) computes the pool's features once and shares them. A
selection option goes to every method that has it (``k`` means nothing to ``longest``); ``run.method_options``
gives options to one method only (``{kmq: {quality_column: quality}}``). ``iterative-kmq`` runs inside the
trainer with :class:`~hf_dataselect.training.DataSelectionCallback` (``budget // num_train_epochs`` new rows per
epoch), unless a ``score_column`` option makes it the offline selector.

Under ``accelerate launch`` the main process selects and the others reuse its saved selections; for selections
that take long (SAE features of an 8B model), run ``--run.stages select`` in one process first.

The package: :mod:`~hf_dataselect.recipes.sections` (our section dataclasses, parsing one section),
:mod:`~hf_dataselect.recipes.recipe` (:class:`Recipe`: overrides, checks, the grid),
:mod:`~hf_dataselect.recipes.training_setup` (model loading, SFT examples), :mod:`~hf_dataselect.recipes.output`
(the output folder, resuming), :mod:`~hf_dataselect.recipes.pipeline` (:func:`run_recipe`) and
:mod:`~hf_dataselect.recipes.summary` (``summary.json`` / ``summary.md``).
"""

from hf_dataselect.recipes.output import prepare_output
from hf_dataselect.recipes.pipeline import RunOutcome, run_recipe
from hf_dataselect.recipes.recipe import Recipe, RunSpec, split_overrides
from hf_dataselect.recipes.sections import (
    DEFERRED_SECTIONS,
    QUALITY_SCORERS,
    STAGES,
    EvaluationArguments,
    QualityArguments,
    RunArguments,
    iterative_section_type,
    parse_section,
    section_types,
)
from hf_dataselect.recipes.summary import write_summary
from hf_dataselect.recipes.training_setup import (
    TESTING_MODEL_PREFIX,
    TESTING_MODELS,
    load_model_for_training,
    resolve_model_path,
    sft_examples,
    uses_chat_template,
)

__all__ = [
    "DEFERRED_SECTIONS",
    "QUALITY_SCORERS",
    "STAGES",
    "TESTING_MODELS",
    "TESTING_MODEL_PREFIX",
    "EvaluationArguments",
    "QualityArguments",
    "Recipe",
    "RunArguments",
    "RunOutcome",
    "RunSpec",
    "iterative_section_type",
    "load_model_for_training",
    "parse_section",
    "prepare_output",
    "resolve_model_path",
    "run_recipe",
    "section_types",
    "sft_examples",
    "split_overrides",
    "uses_chat_template",
    "write_summary",
]
