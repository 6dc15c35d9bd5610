"""Subcommands of the ``hf-dataselect`` CLI, one module each (see :mod:`hf_dataselect.cli`).

A command module defines the dataclasses of its arguments (each field documented with ``metadata["help"]``,
which becomes its ``--help`` text), ``build_parser() -> ConfigParser`` and ``main(argv) -> int``.
"""
