"""The run's output folder: created, or checked to hold the same recipe so that a re-run resumes it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect import atomic
from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from hf_dataselect.recipes.recipe import Recipe

logger = logging.getLogger("hf_dataselect.recipes")

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
    atomic.write_text(saved, recipe.to_yaml())
    return out
