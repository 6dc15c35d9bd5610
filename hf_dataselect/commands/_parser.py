"""Argument parsing shared by every subcommand: dataclasses in, ``--config recipe.yaml`` + overrides.

Arguments are plain dataclasses parsed by :class:`transformers.HfArgumentParser`, so the same dataclasses are
used from Python, from the command line and from YAML recipes (as in TRL and the alignment handbook): a
``--config FILE.yaml`` sets the defaults, and any flag given on the command line overrides them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_dataselect.errors import InputError


class ConfigParser(HfArgumentParser):
    """``HfArgumentParser`` with ``--config FILE.yaml`` (values become defaults) and clean errors."""

    def parse_with_config(self, argv: Sequence[str]) -> tuple[Any, ...]:
        """Parse ``argv`` (which may contain ``--config FILE``) into one instance per dataclass."""
        args = list(argv)
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise InputError("--config needs a YAML file.")
            config_path = args[index + 1]
            del args[index : index + 2]
            self.set_defaults_from(load_yaml_mapping(config_path), source=config_path)
        *outputs, unknown = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        if unknown:  # HfArgumentParser raises a bare ValueError here; argparse's own message is the clear one
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return tuple(outputs[: len(self.dataclass_types)])  # drop the namespace holding --config

    def set_defaults_from(self, values: dict[str, Any], *, source: str) -> None:
        """Use ``values`` (flat ``field: value``) as defaults; unknown keys are an error naming the file."""
        known = {action.dest for action in self._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{source}: unknown field(s) {unknown}; run with --help to see the fields.")
        # every action of a field (a boolean has --x and --no_x) must carry the new default
        for action in self._actions:
            if action.dest in values:
                action.default = values[action.dest]
                action.required = False
        self.set_defaults(**values)

    def error(self, message: str):  # argparse calls this for bad flags; keep its exit status 2
        self.print_usage()
        raise SystemExit(f"{self.prog}: error: {message}")


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (a recipe or config)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No such YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a YAML mapping of field: value.")
    return data


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to a flag's help unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)


def make_parser(prog: str, description: str, dataclass_types: Sequence[type]) -> ConfigParser:
    parser = ConfigParser(
        list(dataclass_types),
        prog=f"hf-dataselect {prog}",
        description=description,
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file whose fields set the defaults of these flags."
    )
    return parser


def parse_option_pairs(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["k=64", "temperature=0.5"]`` -> ``{"k": 64, "temperature": 0.5}`` (values parsed as YAML scalars)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--option expects key=value, got {pair!r}.")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def parse_budget(text: str | int | float) -> int | float:
    """``"1000"`` -> 1000 rows, ``"0.05"`` -> 5 % of the pool."""
    if isinstance(text, int | float):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--budget must be a row count or a fraction, got {text!r}.") from None
