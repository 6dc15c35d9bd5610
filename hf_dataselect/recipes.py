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
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect.commands._parser import load_yaml_mapping, parse_budget
from hf_dataselect.commands._pool import PoolArguments
from hf_dataselect.commands.select import SelectArguments
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_dataselect.evaluation import EvalSet
    from hf_dataselect.selection.result import SelectionResult

logger = logging.getLogger("hf_dataselect.recipes")

STAGES = ("select", "train", "evaluate")
QUALITY_SCORERS = ("reward", "perplexity")
TESTING_MODEL_PREFIX = "testing:"
TESTING_MODELS = ("tiny-llama", "tiny-reward-model")


def _yaml_mapping(text: str) -> dict[str, Any]:
    """Command-line value of a mapping field, e.g. --iterative.scorer_options '{reward_batch_size: 4}'."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):  # ArgumentTypeError: argparse shows this message as it is
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{key: value}}', got {text!r}")
    return value


# -- the sections that are ours ------------------------------------------------------------------------------
@dataclass
class QualityArguments:
    """Score every pool row before selection; the score becomes ``selection.quality_column``."""

    scorer: str | None = field(
        default=None,
        metadata={
            "help": "reward: a sequence-classification reward model scores (prompt, response); perplexity: "
            "minus the response's mean token NLL under a causal LM (fluent, predictable answers score higher). "
            "Default: no scoring."
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of the scoring model (testing:tiny-reward-model works)."},
    )
    column: str = field(default="quality", metadata={"help": "Name of the score column added to the pool."})
    batch_size: int = field(default=8, metadata={"help": "Rows per scoring forward pass."})
    max_length: int = field(
        default=1024, metadata={"help": "Longest (prompt, response) in tokens when scoring."}
    )


@dataclass
class EvaluationArguments:
    """Held-out evaluation: response loss per label, macro-averaged (see :mod:`hf_dataselect.evaluation`)."""

    holdout: str | None = field(
        default=None,
        metadata={
            "help": "Rows of the pool held out for evaluation before anything is selected: a count (500) or a "
            "fraction (0.05). They are never selected nor trained on."
        },
    )
    holdout_seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})
    eval_data: str | None = field(
        default=None,
        metadata={"help": "A separate evaluation file, save_to_disk folder or Hub dataset (any row format)."},
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split of eval_data (Hub datasets)."})
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Column whose values are the labels the loss is averaged over (task, template...)."
        },
    )
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many rows of each evaluation set."}
    )
    epochs: list[int] | None = field(
        default=None,
        metadata={
            "help": "Also evaluate after these training epochs (logged to training/heldout_loss.jsonl)."
        },
    )
    evaluate_base_model: bool = field(
        default=False, metadata={"help": "Evaluate the model before fine-tuning too (a reference row)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per evaluation forward pass."})
    max_length: int = field(default=1024, metadata={"help": "Longest (prompt, response) in tokens."})

    @property
    def enabled(self) -> bool:
        return self.holdout is not None or self.eval_data is not None


@dataclass
class RunArguments:
    """Where the run goes and which selections it makes."""

    output_dir: str = field(default="recipe_run", metadata={"help": "Folder for everything the run writes."})
    methods: list[str] | None = field(
        default=None,
        metadata={
            "help": "Selection methods to run (default: selection.method). Options apply where they fit."
        },
    )
    budgets: list[str] | None = field(
        default=None, metadata={"help": "Budgets to run, counts or fractions (default: selection.budget)."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Selection seeds to run (default: selection.seed)."}
    )
    method_options: _yaml_mapping = field(  # type: ignore[valid-type]  (a mapping; YAML on the command line)
        default_factory=dict,
        metadata={
            "help": "Options for single methods, e.g. {kmq: {quality_column: rating}, kcenter: {embedding_text: "
            "prompt}}; they override the selection options for that method."
        },
    )
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        metadata={
            "help": "Stages to run: select, train, evaluate (training needs model.model_name_or_path)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an output folder that holds a different recipe (else that is an error)."},
    )
    figures: bool = field(default=True, metadata={"help": "Draw the selection figures."})

    def __post_init__(self) -> None:
        # YAML lists arrive unconverted (argparse only converts strings): normalise them here
        if self.methods is not None:
            self.methods = [str(m) for m in self.methods]
        if self.budgets is not None:
            self.budgets = [str(b) for b in self.budgets]
        if self.seeds is not None:
            self.seeds = [int(s) for s in self.seeds]
        self.stages = [str(s) for s in self.stages]
        if not isinstance(self.method_options, dict):
            raise InputError(
                f"run.method_options must be a mapping of method: options, got {self.method_options!r}."
            )


def section_types() -> dict[str, type]:
    """Section name -> the dataclass it is parsed into (TRL's classes are imported here, lazily)."""
    from trl import ModelConfig, SFTConfig

    return {
        "pool": PoolArguments,
        "selection": SelectArguments,
        "quality": QualityArguments,
        "iterative": iterative_section_type(),
        "model": ModelConfig,
        "training": SFTConfig,
        "evaluation": EvaluationArguments,
        "run": RunArguments,
    }


# DataSelectionConfig fields a recipe sets itself: the per-epoch budget follows from the run's budget
_ITERATIVE_FIXED = ("budget_per_epoch",)


def iterative_section_type() -> type:
    """The ``iterative`` section: the fields of :class:`~hf_dataselect.training.DataSelectionConfig`.

    The same fields, defaults and docs, in a form ``HfArgumentParser`` reads (mapping fields are YAML on the
    command line); ``budget_per_epoch`` is left out because a recipe derives it from the run's budget.
    """
    from hf_dataselect.training.callback import DataSelectionConfig

    specs = []
    for f in dataclasses.fields(DataSelectionConfig):
        if f.name in _ITERATIVE_FIXED:
            continue
        kind = _yaml_mapping if f.name == "scorer_options" else f.type
        specs.append((f.name, kind, dataclasses.field(default=f.default, default_factory=f.default_factory)))
    return dataclasses.make_dataclass("IterativeArguments", specs)


# sections kept as checked keyword arguments and built when the stage runs (SFTConfig checks the machine: bf16,
# GPUs...; DataSelectionConfig needs the run's budget)
DEFERRED_SECTIONS = ("training", "iterative")


# -- parsing -------------------------------------------------------------------------------------------------
def _section_parser(name: str, cls: type):
    from transformers import HfArgumentParser

    class SectionParser(HfArgumentParser):
        def error(self, message: str):  # argparse would exit; a recipe error is bad input
            raise InputError(f"recipe section {name!r}: {message}")

    return SectionParser([cls], prog=f"{name}", add_help=False)


def _known_fields(parser) -> dict[str, str]:
    """Every spelling a field accepts (``--a_b``, ``--a-b``, ``--no_a``) -> its destination."""
    spellings: dict[str, str] = {}
    for action in parser._actions:
        for option in action.option_strings:
            spellings[option.lstrip("-")] = action.dest
    return spellings


def _unknown_field_error(
    section: str, unknown: Sequence[str], known: Sequence[str], source: str
) -> InputError:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return InputError(f"{source}: section {section!r} has no field {', '.join(hints)}.")


def parse_section(
    name: str, cls: type, values: dict[str, Any], overrides: Sequence[str], *, source: str, build: bool = True
) -> Any:
    """Parse one section: YAML ``values`` are defaults, ``overrides`` (``--field value`` tokens) win.

    ``build=False`` returns the checked keyword arguments instead of the dataclass (for sections whose
    constructor checks the machine, such as ``SFTConfig`` refusing bf16 without a GPU).
    """
    parser = _section_parser(name, cls)
    spellings = _known_fields(parser)
    unknown = [k for k in values if k not in {a.dest for a in parser._actions}]
    if unknown:
        raise _unknown_field_error(name, unknown, sorted({a.dest for a in parser._actions}), source)
    override_keys = []
    for token in overrides:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0]
            if key not in spellings:
                raise _unknown_field_error(name, [key], sorted(set(spellings.values())), "command line")
            override_keys.append(spellings[key])
    parser.set_defaults(**values)  # updates every action of a field (a bool's --no_x too)
    namespace, rest = parser.parse_known_args(list(overrides))
    if rest:
        raise InputError(f"recipe section {name!r}: could not read {rest} from the command line.")
    given = set(values) | set(override_keys)
    if not build:
        return {key: getattr(namespace, key) for key in sorted(given)}
    kwargs = {a.dest: getattr(namespace, a.dest) for a in parser._actions if hasattr(namespace, a.dest)}
    try:
        return cls(**{k: v for k, v in kwargs.items() if k in {f.name for f in dataclasses.fields(cls)}})
    except (TypeError, ValueError) as err:
        raise InputError(f"{source}: section {name!r} is not valid: {err}") from err


def split_overrides(argv: Sequence[str], sections: Sequence[str]) -> dict[str, list[str]]:
    """``["--selection.budget", "10", "--run.seeds", "0", "1"]`` -> ``{"selection": ["--budget", "10"], ...}``."""
    by_section: dict[str, list[str]] = {}
    current: list[str] | None = None
    for token in argv:
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            section, dot, name = key.partition(".")
            if not dot or not name:
                raise InputError(
                    f"Override {token!r} must name a section and a field, e.g. --selection.budget 1000 "
                    f"(sections: {', '.join(sections)})."
                )
            if section not in sections:
                close = difflib.get_close_matches(section, sections, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(
                    f"Unknown recipe section {section!r}{hint}; sections: {', '.join(sections)}."
                )
            current = by_section.setdefault(section, [])
            current.append(f"--{name}")
            if eq:
                current.append(value)
        elif current is None:
            raise InputError(f"Unexpected argument {token!r}: overrides look like --section.field value.")
        else:
            current.append(token)
    return by_section


@dataclass
class Recipe:
    """A parsed recipe: one dataclass per section (``training`` kept as checked ``SFTConfig`` arguments)."""

    pool: PoolArguments
    selection: SelectArguments
    quality: QualityArguments
    iterative: dict[str, Any]
    """``DataSelectionConfig`` arguments for the runs of method ``iterative-kmq`` trained with the callback."""
    model: Any  # trl.ModelConfig
    training: dict[str, Any]
    evaluation: EvaluationArguments
    run: RunArguments
    source: str = "recipe"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
        """Read ``path`` and apply command-line ``overrides`` (``--section.field value`` tokens)."""
        return cls.from_dict(load_yaml_mapping(path), overrides, source=str(path))

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], overrides: Sequence[str] = (), *, source: str = "recipe"
    ) -> Recipe:
        types = section_types()
        unknown = [k for k in data if k not in types]
        if unknown:
            hints = [
                f"{k!r}"
                + (
                    f" (did you mean {c[0]!r}?)"
                    if (c := difflib.get_close_matches(k, list(types), n=1))
                    else ""
                )
                for k in unknown
            ]
            raise InputError(
                f"{source}: unknown section(s) {', '.join(hints)}; a recipe has the sections {', '.join(types)}."
            )
        for name, values in data.items():
            if values is not None and not isinstance(values, dict):
                raise InputError(f"{source}: section {name!r} must be a mapping of field: value.")
        by_section = split_overrides(overrides, list(types))
        parsed: dict[str, Any] = {}
        for name, section_cls in types.items():
            parsed[name] = parse_section(
                name,
                section_cls,
                dict(data.get(name) or {}),
                by_section.get(name, []),
                source=source,
                build=name not in DEFERRED_SECTIONS,
            )
        recipe = cls(**parsed, source=source)
        recipe.validate()
        return recipe

    # -- checks that need no data and no model -----------------------------------------------------------
    def validate(self) -> None:
        """Cheap consistency checks, run before any work (bad input raises :class:`InputError`)."""
        from hf_dataselect.selection.base import make_selector

        if self.selection.output != "selection" or self.selection.overwrite:
            raise InputError(
                "selection.output / selection.overwrite are set by the recipe; use run.output_dir / run.overwrite."
            )
        if "output_dir" in self.training:
            raise InputError("training.output_dir is set by the recipe (run.output_dir/<run>/training).")
        bad_stages = sorted(set(self.run.stages) - set(STAGES))
        if bad_stages or not self.run.stages:
            raise InputError(f"run.stages must be a subset of {list(STAGES)}, got {self.run.stages}.")
        for budget in self.budgets():
            parse_budget(budget)
        if len(set(self.methods())) != len(self.methods()):
            raise InputError(f"run.methods lists a method twice: {self.methods()}.")
        options = self.selection.method_options()
        used: set[str] = set()
        for method in self.methods():
            accepted = self._method_option_names(method)
            used |= accepted & set(options)
            make_selector(method, self.method_options(method))
        unused = sorted(set(options) - used)
        if unused:
            raise InputError(
                f"Selection option(s) {unused} are not options of any method in {self.methods()}."
            )
        strays = sorted(set(self.run.method_options) - set(self.methods()))
        if strays:
            raise InputError(f"run.method_options names method(s) {strays} that are not in run.methods.")
        if self.quality.scorer is not None:
            if self.quality.scorer not in QUALITY_SCORERS:
                raise InputError(
                    f"quality.scorer must be one of {list(QUALITY_SCORERS)}, got {self.quality.scorer!r}."
                )
            if not self.quality.model:
                raise InputError("quality.scorer needs quality.model (a reward model or a causal LM).")
        if self.evaluation.holdout is not None:
            parse_budget(self.evaluation.holdout)
        if any(self.uses_callback(m) for m in self.methods()):
            if not self.wants("train"):
                raise InputError(
                    "iterative-kmq selects while training (DataSelectionCallback): keep 'train' in run.stages, "
                    "or give --selection.option score_column=COL for the offline version."
                )
            self.data_selection_config(budget_per_epoch=1)
        if self.wants("train") and not self.model.model_name_or_path:
            raise InputError(
                "The train stage needs model.model_name_or_path (or drop 'train' from run.stages)."
            )
        if self.evaluation.epochs and not self.evaluation.enabled:
            raise InputError(
                "evaluation.epochs needs evaluation sets: set evaluation.holdout or evaluation.eval_data."
            )

    @staticmethod
    def _method_option_names(method: str) -> set[str]:
        from hf_dataselect.selection.base import make_selector

        return {f.name for f in dataclasses.fields(make_selector(method, {}))}

    # -- the grid ------------------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return self.run.methods or [self.selection.method]

    def budgets(self) -> list[str]:
        return self.run.budgets or [str(self.selection.budget)]

    def seeds(self) -> list[int]:
        return self.run.seeds or [self.selection.seed]

    def runs(self) -> list[RunSpec]:
        """Every (method, budget, seed) of the grid, in a stable order."""
        return [
            RunSpec(method, budget, seed)
            for method in self.methods()
            for budget in self.budgets()
            for seed in self.seeds()
        ]

    def method_options(self, method: str) -> dict[str, Any]:
        """Options for ``method``: the selection options it accepts, then its own ``run.method_options``.

        A sweep mixes methods with different options (``k`` means nothing to ``longest``), so a selection-level
        option goes to the methods that have it; ``run.method_options`` sets options for one method only.
        """
        accepted = self._method_option_names(method)
        options = {k: v for k, v in self.selection.method_options().items() if k in accepted}
        own = self.run.method_options.get(method) or {}
        if not isinstance(own, dict):
            raise InputError(
                f"run.method_options[{method!r}] must be a mapping of option: value, got {own!r}."
            )
        return {**options, **own}

    def wants(self, stage: str) -> bool:
        return stage in self.run.stages

    def uses_callback(self, method: str) -> bool:
        """``iterative-kmq`` selects during training unless a per-row score column makes it offline."""
        return method == "iterative-kmq" and "score_column" not in self.selection.method_options()

    def data_selection_config(self, budget_per_epoch: int, seed: int | None = None):
        """The callback's :class:`~hf_dataselect.training.DataSelectionConfig` (checked) for one run."""
        from hf_dataselect.training.callback import DataSelectionConfig

        kwargs = dict(self.iterative)
        if seed is not None and kwargs.get("seed") is None:
            kwargs["seed"] = seed
        try:
            config = DataSelectionConfig(budget_per_epoch=budget_per_epoch, **kwargs)
        except TypeError as err:
            raise InputError(f"iterative section: {err}") from err
        config.validate()
        return config

    def sft_config(self, output_dir: str | os.PathLike):
        """The ``trl.SFTConfig`` of this recipe, writing to ``output_dir``."""
        from trl import SFTConfig

        try:
            return SFTConfig(**self.training, output_dir=str(output_dir))
        except ValueError as err:
            raise InputError(f"training section: {err}") from err

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Sections as plain data: every field that differs from its default (reloads to the same recipe)."""
        out: dict[str, Any] = {}
        for name in section_types():
            value = getattr(self, name)
            if isinstance(value, dict):
                section = {k: _plain(v) for k, v in value.items()}
            else:
                section = {
                    f.name: _plain(getattr(value, f.name))
                    for f in dataclasses.fields(value)
                    if f.init and _plain(getattr(value, f.name)) != _plain(_field_default(f))
                }
            if section:
                out[name] = section
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _plain(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# -- one cell of the grid ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    method: str
    budget: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.budget}-seed{self.seed}"


# -- models ----------------------------------------------------------------------------------------------------
def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``testing:tiny-llama`` / ``testing:tiny-reward-model`` -> a local folder built once; anything else as is.

    The ``testing:`` models are the random-init models of :mod:`hf_dataselect.testing`: they make CPU recipes and
    tests run end to end without the network; they learn, but know nothing before training.
    """
    if not name.startswith(TESTING_MODEL_PREFIX):
        return name
    which = name[len(TESTING_MODEL_PREFIX) :]
    if which not in TESTING_MODELS:
        raise InputError(
            f"Unknown test model {name!r}; available: {[TESTING_MODEL_PREFIX + m for m in TESTING_MODELS]}."
        )
    root = Path(cache_dir or os.environ.get("HF_DATASELECT_CACHE", Path.home() / ".cache" / "hf_dataselect"))
    folder = root / "models" / which
    if (folder / "config.json").is_file():
        return str(folder)
    from hf_dataselect.testing import build_tiny_causal_lm, build_tiny_reward_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{which}.", dir=folder.parent))
    try:
        (build_tiny_causal_lm if which == "tiny-llama" else build_tiny_reward_model)(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not a concurrent build that won the race
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(folder)


def load_model_for_training(model_args: Any, training: dict[str, Any]):
    """The causal LM and tokenizer named by a ``trl.ModelConfig`` (safetensors only), plus its PEFT config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model_path(model_args.model_name_or_path)
    trust = bool(training.get("trust_remote_code", False))
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": trust,
    }
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=trust
    )
    peft_config = None
    if model_args.use_peft:
        try:
            from trl import get_peft_config

            peft_config = get_peft_config(model_args)
        except ImportError as err:
            raise InputError("model.use_peft needs the peft package: pip install peft.") from err
    return model, tokenizer, peft_config


# -- data for SFT ------------------------------------------------------------------------------------------------
def sft_examples(
    dataset: Dataset,
    *,
    conversational: bool,
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> Dataset:
    """Rows of any instruction format as TRL prompt-completion examples.

    ``conversational=True``: a user turn and an assistant turn (the tokenizer's chat template applies);
    otherwise plain text ``prompt + "\\n\\n"`` / ``response`` (SFTTrainer appends EOS). Either way the loss is on
    the response only, and :func:`hf_dataselect.evaluation.heldout_loss` tokenizes held-out pairs the same way.
    Multi-turn conversations are flattened into one user turn, as the selectors see them.
    """
    from datasets import Dataset

    from hf_dataselect.data import pool_prompt_response
    from hf_dataselect.formatting import RowFormat, check_texts
    from hf_dataselect.scoring import PairEncoder

    row_format = RowFormat.resolve(
        dataset.column_names, prompt_column=prompt_column, response_column=response_column
    )
    prompts, responses = pool_prompt_response(dataset, row_format)
    check_texts(prompts, responses, need_response=True)
    if conversational:
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": p}] for p in prompts],
                "completion": [[{"role": "assistant", "content": r}] for r in responses],
            }
        )
    return Dataset.from_dict(
        {"prompt": [p + PairEncoder.separator for p in prompts], "completion": responses}
    )


def uses_chat_template(tokenizer: Any, training: dict[str, Any]) -> bool:
    """Train (and evaluate) with the chat template when the tokenizer has one or the recipe provides one."""
    return bool(getattr(tokenizer, "chat_template", None)) or bool(training.get("chat_template_path"))


# -- output folder ---------------------------------------------------------------------------------------------
# fields that change how a run proceeds, not what it computes
_RESUME_NEUTRAL = {("run", "overwrite"), ("run", "stages"), ("run", "figures")}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {
        section: {k: v for k, v in values.items() if (section, k) not in _RESUME_NEUTRAL}
        for section, values in config.items()
    }


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old, new = _comparable(old), _comparable(new)
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, ensure_ascii=False, default=str)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


def prepare_output(recipe: Recipe) -> Path:
    """Create (or check, to resume) the output folder and write ``recipe.yaml`` into it."""
    import yaml

    out = Path(recipe.run.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"run.output_dir {out} exists and is not a folder.")
    saved = out / "recipe.yaml"
    if out.exists() and any(out.iterdir()):
        if saved.is_file():
            diffs = _config_differences(yaml.safe_load(saved.read_text()) or {}, recipe.to_dict())
            problem = f"holds a run of a different recipe ({'; '.join(diffs[:5])})" if diffs else None
        else:
            problem = "is not empty and holds no recipe run"
        if problem is None:
            logger.info("Resuming the run in %s.", out)
        elif not recipe.run.overwrite:
            raise InputError(
                f"{out} {problem}; choose another run.output_dir, or pass --run.overwrite true to replace it."
            )
        else:
            logger.info("Replacing %s (--run.overwrite true).", out)
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(saved, recipe.to_yaml())
    return out


# -- the pipeline ------------------------------------------------------------------------------------------------
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
                _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

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
            os.replace(staging, model_folder)
            write_json(folder / "training_log.json", trainer.state.log_history)
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
        write_json(path, {"run": spec.name, "eval_sets": outcome.evaluation})

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
        write_json(path, {"model": self.recipe.model.model_name_or_path, "eval_sets": results})
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
        write_json(out / "run.json", status)
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
                write_json(folder / "outcome.json", {"stages": recipe.run.stages, **outcome.to_dict()})
            outcomes.append(outcome)
        status.update(status="done")
    except BaseException as err:
        status.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        status.update(seconds=round(time.perf_counter() - started, 1), stages=pipeline.timings)
        if state.is_main_process:
            write_json(out / "run.json", status)
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


def write_summary(out: Path, outcomes: Sequence[RunOutcome], base: dict[str, Any] | None) -> None:
    """``summary.json`` and a Markdown table ``summary.md`` with one row per run."""
    rows = [o.summary_row() for o in outcomes]
    write_json(out / "summary.json", {"base_model": base, "runs": rows})
    eval_names = sorted({k[: -len("_macro_loss")] for row in rows for k in row if k.endswith("_macro_loss")})
    header = ["run", "rows", "selection s", "train s", "train loss"]
    header += [f"{name} macro loss" for name in eval_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if base:
        cells = ["base model (not fine-tuned)", "", "", "", ""]
        cells += [_fmt(base.get(name, {}).get("macro_loss")) for name in eval_names]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        cells = [
            row["run"],
            _fmt(row["rows"]),
            _fmt(row["selection_seconds"], 1),
            _fmt(row["train_seconds"], 1),
            _fmt(row["train_loss"]),
        ]
        cells += [_fmt(row.get(f"{name}_macro_loss")) for name in eval_names]
        lines.append("| " + " | ".join(cells) + " |")
    _write_text(out / "summary.md", "\n".join(lines) + "\n")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
