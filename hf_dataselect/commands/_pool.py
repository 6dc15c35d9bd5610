"""The pool arguments every data-reading subcommand shares (``select``, ``compare``, ``run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class PoolArguments:
    """Where the instruction pool comes from and how its rows become text."""

    data: str | None = field(
        default=None,
        metadata={
            "help": "The pool: a JSON/JSONL/CSV/TSV/Parquet file, a folder written by save_to_disk, or a Hugging "
            "Face Hub dataset id. Default: the built-in demo pool (3,000 generated rows with planted "
            "near-duplicates and low-quality answers)."
        },
    )
    split: str | None = field(
        default=None, metadata={"help": "Split to use (Hub datasets, DatasetDict folders)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows of the pool."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column with the prompt (default: auto-detected from the columns)."}
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Column with the response (default: auto-detected)."}
    )
    id_column: str | None = field(
        default=None,
        metadata={"help": "Column of stable row ids (default: id/row_id/uid/idx, else a content hash)."},
    )

    def load(self) -> Dataset:
        from hf_dataselect.data import load_pool

        if self.data is None:
            from hf_dataselect.demo import demo_pool_path

            return load_pool(demo_pool_path(), max_rows=self.max_rows)
        return load_pool(self.data, split=self.split, config=self.dataset_config, max_rows=self.max_rows)

    def select_kwargs(self) -> dict[str, Any]:
        """Formatting keyword arguments for :func:`hf_dataselect.select`."""
        return {
            "prompt_column": self.prompt_column,
            "response_column": self.response_column,
            "id_column": self.id_column,
        }

    def describe(self) -> str:
        return self.data or "the built-in demo pool"


def positional_data(argv: list[str]) -> list[str]:
    """Allow ``hf-dataselect select DATA ...``: a leading non-flag argument is ``--data``."""
    if argv and not argv[0].startswith("-"):
        return ["--data", argv[0], *argv[1:]]
    return argv
