"""Iterative kMQ inside training: a callback for the stock ``Trainer``/``SFTTrainer``, its sampler and scorers.

Imported lazily (``transformers`` and ``torch`` load on first use)::

    from hf_dataselect.training import DataSelectionCallback
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_ATTRIBUTES: dict[str, str] = {
    "DataSelectionCallback": "hf_dataselect.training.callback",
    "DataSelectionConfig": "hf_dataselect.training.callback",
    "SelectionSampler": "hf_dataselect.training.sampler",
    "LossScorer": "hf_dataselect.training.scorers",
    "PerplexityGapScorer": "hf_dataselect.training.scorers",
    "RewardGapScorer": "hf_dataselect.training.scorers",
    "CallableScorer": "hf_dataselect.training.scorers",
    "make_scorer": "hf_dataselect.training.scorers",
}

__all__ = list(_LAZY_ATTRIBUTES)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_dataselect.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
