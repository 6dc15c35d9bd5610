"""``hf-dataselect run RECIPE.yaml [--section.field value ...]``: a whole pipeline from one YAML recipe.

Selection, fine-tuning and evaluation of every method × budget × seed the recipe lists, written to one output
folder (see :mod:`hf_dataselect.recipes`). ``--dry-run`` only checks the recipe and prints it resolved.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = (
    "Run a whole pipeline from one YAML recipe: load the pool, compute features, select (every method x budget "
    "x seed the recipe lists), fine-tune on each subset and evaluate, all written to one output folder. Any "
    "recipe field can be overridden as --section.field value. A re-run with the same recipe resumes."
)

EPILOG = """sections and their fields:
  pool        --pool.data --pool.split --pool.max_rows --pool.prompt_column ...   (as in `hf-dataselect select`)
  selection   --selection.method --selection.budget --selection.seed --selection.k --selection.sae ...
  quality     --quality.scorer reward|perplexity --quality.model PATH --quality.column quality
  model       trl.ModelConfig: --model.model_name_or_path --model.dtype --model.use_peft --model.lora_r ...
  training    trl.SFTConfig: --training.num_train_epochs --training.learning_rate --training.bf16 ...
  evaluation  --evaluation.holdout 0.05 --evaluation.label_column COL --evaluation.epochs 1 2 3 ...
  run         --run.output_dir DIR --run.methods kmq random --run.budgets 1000 3000 --run.seeds 0 1 2
              --run.stages select train evaluate --run.overwrite true

examples:
  hf-dataselect run recipes/kmq_cpu.yaml
  hf-dataselect run recipes/kmq_cpu.yaml --selection.budget 200 --run.output_dir runs/kmq-200
  hf-dataselect run recipes/sae_paper.yaml --dry-run
  accelerate launch -m hf_dataselect.cli run recipes/kmq_paper.yaml --run.stages train evaluate
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dataselect run",
        allow_abbrev=False,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", help="The recipe YAML file (or give it with --config).")
    parser.add_argument("--config", metavar="RECIPE.yaml", help="The recipe YAML file.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Check the recipe and print it resolved; run nothing."
    )
    return parser


def split_arguments(argv: Sequence[str]) -> tuple[str | None, bool, list[str]]:
    """``(recipe path, dry run, overrides)``; ``--help`` prints the help and exits."""
    from hf_dataselect.errors import InputError

    recipe: str | None = None
    dry_run = False
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if token in ("-h", "--help"):
            build_parser().print_help()
            raise SystemExit(0)
        if token == "--dry-run":
            dry_run = True
        elif token == "--config" or token.startswith("--config="):
            if recipe is not None:
                raise InputError("Give the recipe once: as the first argument or with --config, not both.")
            if "=" in token:
                recipe = token.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                recipe = args[i]
            else:
                raise InputError("--config needs a recipe YAML file.")
        elif i == 0 and not token.startswith("-"):
            recipe = token
        else:
            overrides.append(token)
        i += 1
    return recipe, dry_run, overrides


def main(argv: Sequence[str]) -> int:
    from hf_dataselect.errors import InputError
    from hf_dataselect.recipes import Recipe, run_recipe

    path, dry_run, overrides = split_arguments(argv)
    if path is None:
        raise InputError(
            "hf-dataselect run needs a recipe: hf-dataselect run RECIPE.yaml [--section.field value]."
        )
    recipe = Recipe.from_yaml(path, overrides)
    if dry_run:
        sys.stdout.write(recipe.to_yaml())
        names = ", ".join(spec.name for spec in recipe.runs())
        print(f"# {len(recipe.runs())} run(s): {names}; stages: {', '.join(recipe.run.stages)}")
        return 0
    outcomes = run_recipe(recipe)
    summary = Path(recipe.run.output_dir) / "summary.md"
    print(summary.read_text(encoding="utf-8").rstrip())
    print(f"{len(outcomes)} run(s) written to {recipe.run.output_dir}/")
    return 0
