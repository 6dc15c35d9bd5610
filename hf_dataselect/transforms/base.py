"""The base class of every ``datasets.map`` transform.

``datasets`` names the cache file of a ``.map`` after a hash of the function and everything it holds. A callable
that keeps a loaded model would either hash every weight (slow) or fall back to a random hash (never cached).
A :class:`MapTransform` therefore pickles only its dataclass fields (the configuration); whatever it loads at
run time lives in attributes whose names start with ``_runtime`` and is rebuilt lazily in each process,
including ``num_proc`` workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any

RUNTIME_PREFIX = "_runtime"


class MapTransform(ABC):
    """Mixin for dataclass transforms: config-only pickling and a lazily built runtime object.

    Subclasses are dataclasses that implement :meth:`_build_runtime` (load models, tokenizers...) and
    ``__call__(batch) -> dict``; they read the runtime with :meth:`runtime`.
    """

    def runtime(self) -> Any:
        """The object :meth:`_build_runtime` returned, built on first use in this process."""
        runtime = self.__dict__.get(f"{RUNTIME_PREFIX}_object")
        if runtime is None:
            runtime = self._build_runtime()
            self.__dict__[f"{RUNTIME_PREFIX}_object"] = runtime
        return runtime

    @abstractmethod
    def _build_runtime(self) -> Any:
        """Load what ``__call__`` needs (models, tokenizers); called once per process."""

    def config_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-friendly dict (for manifests and logs)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith(RUNTIME_PREFIX)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
