"""A parsed recipe: its sections, command-line overrides, the checks made before any work, and its grid."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hf_dataselect.commands._parser import load_yaml_mapping, parse_budget
from hf_dataselect.commands._pool import PoolArguments
from hf_dataselect.commands.select import SelectArguments
from hf_dataselect.errors import InputError
from hf_dataselect.recipes.sections import (
    DEFERRED_SECTIONS,
    QUALITY_SCORERS,
    STAGES,
    EvaluationArguments,
    QualityArguments,
    RunArguments,
    parse_section,
    section_types,
)


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
