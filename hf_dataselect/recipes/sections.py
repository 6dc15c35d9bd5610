"""The sections of a recipe that hf_dataselect defines, and how one section is parsed.

Every section is a dataclass read by :class:`transformers.HfArgumentParser`: YAML values are its defaults and
``--field value`` tokens from the command line override them; unknown fields are errors that name the closest
valid spelling.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_dataselect.commands._pool import PoolArguments
from hf_dataselect.commands.select import SelectArguments
from hf_dataselect.errors import InputError

STAGES = ("select", "train", "evaluate")
QUALITY_SCORERS = ("reward", "perplexity")


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
