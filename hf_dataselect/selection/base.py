"""What every selector shares: the budget rule, the selector interface and the registry of method names.

A selector is a dataclass whose fields are the method's options. :func:`hf_dataselect.select` builds it from
keyword arguments, asks it to :meth:`~Selector.validate` the input (cheap checks, before any work), to
:meth:`~Selector.prepare` missing columns (embeddings, clusters, SAE features...), and finally to
:meth:`~Selector.run` on the prepared pool, which returns exactly ``budget`` distinct row positions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import RowFormat, check_texts

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("hf_dataselect.selection")


def resolve_budget(budget: int | float, pool_size: int) -> int:
    """Number of rows to select: an int ``1..pool_size``, or a fraction in ``(0, 1]`` of the pool."""
    if isinstance(budget, bool) or not isinstance(budget, int | float | np.integer | np.floating):
        raise InputError(f"budget must be a number of rows or a fraction of the pool, got {budget!r}.")
    if pool_size <= 0:
        raise InputError("The pool is empty: there is nothing to select from.")
    if isinstance(budget, float | np.floating):
        if not math.isfinite(budget) or budget <= 0:
            raise InputError(f"budget must be positive, got {budget}.")
        if budget <= 1.0:
            return max(1, round(budget * pool_size))
        if not float(budget).is_integer():
            raise InputError(
                f"A fractional budget must be in (0, 1]; {budget} is neither a fraction nor a row count."
            )
        budget = int(budget)
    budget = int(budget)
    if budget <= 0:
        raise InputError(f"budget must be at least 1 row, got {budget}.")
    if budget > pool_size:
        raise InputError(f"budget {budget} is larger than the pool ({pool_size} rows).")
    return budget


@dataclass
class SelectionOutput:
    """What :meth:`Selector.run` returns."""

    positions: np.ndarray
    """Selected row positions in the prepared pool, in the method's pick order."""
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """Per selected row (aligned with ``positions``): gain, cluster, quality, similarity..."""
    info: dict[str, Any] = field(default_factory=dict)
    """Method-level facts for the manifest and report: clustering, cluster counts, coverage curve, δ..."""
    new_columns: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-row columns computed for the whole pool (e.g. ``cluster``), added to the result's pool."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """File name -> object with ``save(path)`` (e.g. fitted centroids), written by ``SelectionResult.save``."""


@dataclass
class SelectionContext:
    """Per-call facts a selector may need besides its own options."""

    seed: int
    column_names: list[str]
    prompt_column: str | None = None
    response_column: str | None = None
    formatter: Callable[..., tuple[str, str]] | None = None
    row_format_name: str | None = None

    @cached_property
    def row_format(self) -> RowFormat:
        """How rows become text (auto-detected unless the user said); raises if it cannot be told."""
        return RowFormat.resolve(
            self.column_names,
            prompt_column=self.prompt_column,
            response_column=self.response_column,
            formatter=self.formatter,
            row_format=self.row_format_name,
        )

    def rng(self, *stream: int) -> np.random.Generator:
        """A generator seeded from the selection seed (and optional sub-stream ids)."""
        return np.random.default_rng([self.seed, *stream])

    def check_texts(self, dataset: Dataset, *, need_response: bool = False) -> tuple[list[str], list[str]]:
        """Prompts and responses of every row, after checking none is empty."""
        from hf_dataselect.data import pool_prompt_response

        prompts, responses = pool_prompt_response(dataset, self.row_format)
        check_texts(prompts, responses, need_response=need_response)
        return prompts, responses


@dataclass
class Selector(ABC):
    """Base class of selection methods: dataclass fields are the method's options."""

    name: ClassVar[str] = ""

    def validate(self, dataset: Dataset, budget: int, context: SelectionContext) -> None:  # noqa: B027
        """Cheap checks that must fail before any expensive work (columns, option ranges)."""

    def prepare(self, dataset: Dataset, context: SelectionContext) -> Dataset:
        """Add the columns :meth:`run` needs when they are missing (and log that they were computed)."""
        return dataset

    @abstractmethod
    def run(self, dataset: Dataset, budget: int, context: SelectionContext) -> SelectionOutput:
        """Exactly ``budget`` distinct positions of ``dataset``, deterministic for ``context.seed``."""

    def options(self) -> dict[str, Any]:
        """The options as given (for the manifest)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


S = TypeVar("S", bound=type[Selector])
_REGISTRY: dict[str, tuple[type[Selector], dict[str, Any]]] = {}


def register_selector(name: str, **preset: Any) -> Callable[[S], S]:
    """Class decorator: make ``name`` a method of :func:`~hf_dataselect.select` (``preset`` fixes options)."""

    def decorate(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"Selection method {name!r} is registered twice.")
        _REGISTRY[name] = (cls, preset)
        if not cls.name:
            cls.name = name
        return cls

    return decorate


def register_variant(name: str, cls: type[Selector], **preset: Any) -> None:
    """Register another name for ``cls`` with some options fixed (e.g. ``kmq-random``)."""
    register_selector(name, **preset)(cls)


def available_methods() -> list[str]:
    """Names accepted by :func:`hf_dataselect.select` and ``hf-dataselect select --method``."""
    import hf_dataselect.selection  # noqa: F401  (registers the built-in methods)

    return sorted(_REGISTRY)


def make_selector(method: str, options: dict[str, Any]) -> Selector:
    """Instantiate the selector registered as ``method`` with ``options`` (clear errors for typos)."""
    available_methods()
    if method not in _REGISTRY:
        raise InputError(f"Unknown selection method {method!r}; available: {', '.join(sorted(_REGISTRY))}.")
    cls, preset = _REGISTRY[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"Method {method!r} has no option(s) {unknown}; its options are {sorted(known)}.")
    clashing = sorted(k for k in options if k in preset and options[k] != preset[k])
    if clashing:
        raise InputError(f"Method {method!r} fixes {clashing}; use another method name to change them.")
    return cls(**{**options, **preset})


def method_option_names(method: str) -> set[str]:
    """Options ``method`` accepts (its dataclass fields, minus those its registered name fixes)."""
    available_methods()
    if method not in _REGISTRY:
        raise InputError(f"Unknown selection method {method!r}; available: {', '.join(sorted(_REGISTRY))}.")
    cls, preset = _REGISTRY[method]
    return {f.name for f in dataclasses.fields(cls)} - set(preset)
