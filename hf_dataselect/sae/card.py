"""The ``README.md`` model card of a folder (or Hub repo) of SAEs, rendered from ``model_cards/``.

The template lives in the top-level ``model_cards/`` folder, installed as the resource package
``hf_dataselect.model_cards``. Its YAML front matter carries the Hub metadata (``library_name``,
``base_model``, ``tags``, ``datasets``, ``license``); ``base_model`` and ``datasets`` are only written when they
are Hub ids (a local path there would be rejected by the Hub).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from hf_dataselect.errors import InputError

TEMPLATE = "sae_model_card.md.jinja"
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["sparse-autoencoder", "sae", "topk-sae", "interpretability", "data-selection", "hf_dataselect"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` looks like a Hub repo id (``owner/name`` or ``name``) and not like a local path."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or ".." in name:
        return False
    return not Path(name).exists()


def load_template() -> str:
    return resources.files("hf_dataselect.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")


def render_model_card(
    saes: list[dict[str, Any]],
    *,
    repo_id: str | None = None,
    location: str | None = None,
    license: str | None = None,
    title: str | None = None,
) -> str:
    """Markdown with YAML front matter for the SAEs described by ``saes`` (one metadata dict per hookpoint).

    ``repo_id`` (on the Hub) or ``location`` (a local folder) is what the usage snippet loads.
    """
    import jinja2

    if not saes:
        raise InputError("A model card needs at least one SAE.")
    entries = [dict(entry) for entry in sorted(saes, key=lambda e: str(e.get("hookpoint")))]
    for entry in entries:
        dataset = entry.get("dataset")
        entry["dataset_text"] = f"`{dataset}`" if dataset else "texts given by the user"
    base_models = sorted({str(e["base_model"]) for e in entries if e.get("base_model")})
    hub_base = [m for m in base_models if is_hub_id(m)]
    datasets = sorted({str(e["dataset"]) for e in entries if e.get("dataset") and is_hub_id(e["dataset"])})
    licenses = sorted({str(e["license"]) for e in entries if e.get("license")})
    environment = jinja2.Environment(
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters.update(yaml=_yaml_scalar, metric=_metric, percent=_percent, count=_count)
    first = entries[0]
    usage_model = hub_base[0] if hub_base else (base_models[0] if base_models else "MODEL")
    hookpoints = ", ".join(str(e.get("hookpoint")) for e in entries)
    return environment.from_string(load_template()).render(
        saes=entries,
        first=first,
        base_model=hub_base[0] if len(hub_base) == 1 else None,
        base_model_text=", ".join(f"`{m}`" for m in base_models) or "a language model",
        usage_model=usage_model,
        tags=TAGS + ([] if first.get("activation", "topk") == "topk" else [str(first["activation"])]),
        datasets=datasets,
        license=license or (licenses[0] if len(licenses) == 1 else DEFAULT_LICENSE),
        title=title or f"TopK SAEs for {usage_model.split('/')[-1]} ({hookpoints})",
        location=repo_id or location or ".",
        dead_tokens_threshold=first.get("dead_tokens_threshold"),
    )


def _yaml_scalar(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def _metric(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | float) and value == value:
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return "–"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, int | float) and value == value else "–"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"
