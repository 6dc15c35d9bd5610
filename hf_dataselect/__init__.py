"""hf_dataselect: diversity-driven selection of instruction-tuning data for the Hugging Face ecosystem.

The public API is small and imported lazily, so that ``import hf_dataselect`` (and ``hf-dataselect --help``)
stays fast: torch, transformers and faiss are loaded only when something that needs them is used.

    >>> from hf_dataselect import Embeddings, select
    >>> ds = ds.map(Embeddings(), batched=True)          # adds an `embedding` column (cached like any .map)
    >>> result = select(ds, "kmq", budget=1000, seed=0)  # exactly 1000 distinct rows
    >>> result.save("out/")                              # selected rows, manifest.json, figures
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_ATTRIBUTES: dict[str, str] = {
    "select": "hf_dataselect.selection",
    "SelectionResult": "hf_dataselect.selection.result",
    "available_methods": "hf_dataselect.selection",
    "RowFormat": "hf_dataselect.formatting",
    "detect_format": "hf_dataselect.formatting",
    "Embeddings": "hf_dataselect.transforms.embed",
    "ClusterIds": "hf_dataselect.transforms.clusters",
    "RewardScores": "hf_dataselect.transforms.quality",
    "PerplexityScores": "hf_dataselect.transforms.quality",
    "SAEFeatures": "hf_dataselect.transforms.sae_features",
    "KMeans": "hf_dataselect.cluster",
    "fit_kmeans": "hf_dataselect.cluster",
    "choose_k": "hf_dataselect.cluster",
    "TopKSAE": "hf_dataselect.sae.model",
    "train_sae": "hf_dataselect.sae.train",
    "IterativeKMQ": "hf_dataselect.selection.iterative_kmq",
    "DataSelectionCallback": "hf_dataselect.training.callback",
    "DataSelectionConfig": "hf_dataselect.training.callback",
    "map_across_processes": "hf_dataselect.distributed",
    "Recipe": "hf_dataselect.recipes",
    "run_recipe": "hf_dataselect.recipes",
    "EvalSet": "hf_dataselect.evaluation",
    "heldout_loss": "hf_dataselect.evaluation",
    "HeldOutLossCallback": "hf_dataselect.evaluation",
    "explain_selection": "hf_dataselect.interpret",
    "selection_metrics": "hf_dataselect.metrics",
    "load_pool": "hf_dataselect.data",
    "demo_pool": "hf_dataselect.demo",
}

__all__ = ["__version__", *_LAZY_ATTRIBUTES]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_dataselect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
