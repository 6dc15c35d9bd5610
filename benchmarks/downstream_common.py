"""Shared pieces of the downstream proxy benchmark (``bench_downstream.py``, ``downstream_train.py``).

The proxy: train the same small causal LM from scratch on each method's subset of an imbalanced T0 pool and
measure held-out response loss per template, macro-averaged over templates. Everything that must be identical
across runs (pool, held-out rows, tokenizer, architecture, optimiser, steps) is fixed here.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

T0_DIR = Path("/work/shared/data/self_instruct/data/finetuning/t0_train_50k/data_per_template")
DEFAULT_CACHE = Path(os.environ.get("HF_DATASELECT_BENCH_CACHE", "/work/cache/hf_dataselect/downstream"))
LOCK = "/tmp/hf_dataselect_heavy.lock"
END_MARKER = "<|endoftext|>"


@dataclass(frozen=True)
class PoolSetup:
    """How the imbalanced T0 pool and its held-out evaluation sets are drawn (seeded)."""

    seed: int = 0
    transfer_templates: int = 24
    """Templates held out of the pool entirely: the transfer evaluation set."""
    transfer_rows_per_template: int = 8
    inpool_eval_rows_per_template: int = 4
    """Rows of each pool template held out (never in the pool): the in-distribution evaluation set."""
    min_share: float = 0.04
    """Each pool template keeps a share of its remaining rows drawn log-uniformly in [min_share, 1]."""
    max_tokens: int = 160
    """Training/evaluation text budget per row (chat template included): longer prompts lose their start."""
    max_completion_tokens: int = 64


@dataclass(frozen=True)
class ModelSetup:
    """The fixed proxy model and optimiser (a Llama from scratch; about 1M parameters)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0

    def llama_config(self, tokenizer: Any):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def kept_interpretation(output: Path) -> list[str]:
    """The hand-written "Interpretation" section of an earlier report, kept when the tables are regenerated."""
    marker = "## Interpretation"
    if output.is_file() and marker in output.read_text():
        return [marker + output.read_text().split(marker, 1)[1].rstrip("\n")]
    return [marker, "", "(written by hand from the tables above)", ""]


def setup_dict() -> dict[str, Any]:
    return {"pool": asdict(PoolSetup()), "model": asdict(ModelSetup())}
