"""The ``hf-dataselect`` command line.

Each subcommand lives in its own module under :mod:`hf_dataselect.commands` and is imported only when it runs,
so ``hf-dataselect --help`` is instant. Bad input (:class:`~hf_dataselect.errors.InputError`) prints
``error: ...`` and exits with status 2, with no traceback and no partial output.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from hf_dataselect import __version__
from hf_dataselect.errors import InputError

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "select": ("hf_dataselect.commands.select", "Select a diverse subset of an instruction pool."),
    "compare": ("hf_dataselect.commands.compare", "Run several selectors on one pool and compare them."),
    "train-sae": (
        "hf_dataselect.commands.train_sae",
        "Train a TopK sparse autoencoder on a model's hidden states.",
    ),
    "run": ("hf_dataselect.commands.run", "Run a YAML recipe (selection, training, evaluation) end to end."),
    "demo": ("hf_dataselect.commands.demo", "Write the built-in demo pool to a JSONL file."),
}

USAGE = """usage: hf-dataselect <command> [options]     (hf-dataselect <command> --help for its options)

Diversity-driven selection of instruction-tuning data.

commands:
{commands}

examples:
  hf-dataselect select                                    # kMQ, 10 % of the built-in demo pool -> ./selection
  hf-dataselect select data.jsonl --method kmq --budget 1000 --output out/
  hf-dataselect select tatsu-lab/alpaca --split train --method longest --budget 0.05 --output out/
"""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {description}" for name, (_, description) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"hf-dataselect {__version__}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        print(
            f"hf-dataselect: unknown command {command!r}; choose from {', '.join(COMMANDS)}.", file=sys.stderr
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("faiss", "faiss.loader", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(args[1:]) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
