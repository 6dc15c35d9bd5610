"""``hf-dataselect demo``: write the built-in demo pool to a JSONL file (to look at it, or to edit it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_dataselect import atomic
from hf_dataselect.commands._parser import make_parser
from hf_dataselect.demo import DEMO_ROWS, demo_rows


@dataclass
class DemoArguments:
    output: str = field(default="demo_pool.jsonl", metadata={"help": "JSONL file to write."})
    rows: int = field(default=DEMO_ROWS, metadata={"help": "Number of rows to generate."})
    seed: int = field(default=0, metadata={"help": "Generator seed (the pool is deterministic per seed)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the file if it exists."})


def build_parser():
    return make_parser("demo", __doc__.split(":", 1)[1].strip(), [DemoArguments])


def main(argv: Sequence[str]) -> int:
    from hf_dataselect.errors import InputError

    (args,) = build_parser().parse_with_config(argv)
    target = Path(args.output)
    if target.exists() and not args.overwrite:
        raise InputError(f"{target} exists; pass --overwrite to replace it.")
    rows = demo_rows(args.rows, args.seed)
    atomic.write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"Wrote {len(rows)} rows to {target}.")
    return 0
