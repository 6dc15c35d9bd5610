"""Real text for the SAE benchmarks: LIMA and a seeded sample of the T0 pool (from ../shared/data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SHARED = Path("/work/shared/data")
LIMA = SHARED / "lima/scripts/data/raw_train/lima/train.jsonl"
T0_DIR = SHARED / "self_instruct/data/finetuning/t0_train_50k/data_per_template"
END_OF_TEXT = "<|endoftext|>"


def check_data(lima: Path, t0_dir: Path) -> None:
    missing = [str(p) for p in (lima, t0_dir) if not p.exists()]
    if missing:
        raise SystemExit(
            f"Benchmark data not found: {missing}. These default to ../shared/data (not part of the repository); "
            "pass --lima and --t0-dir."
        )


def lima_rows(path: Path = LIMA) -> list[dict]:
    """LIMA training conversations as ``{"conversations": [user, assistant, ...]}`` rows."""
    with open(path) as handle:
        return [{"conversations": json.loads(line)["conversations"]} for line in handle if line.strip()]


def t0_rows(directory: Path = T0_DIR, n: int = 2000, seed: int = 0) -> list[dict]:
    """A seeded uniform sample of ``n`` T0 rows ``{"prompt", "completion"}`` (the trailing <|endoftext|> removed)."""
    rows = []
    for file in sorted(directory.glob("*.jsonl")):
        with open(file) as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    completion = row["completion"]
                    if completion.endswith(END_OF_TEXT):
                        completion = completion[: -len(END_OF_TEXT)]
                    rows.append({"prompt": row["prompt"], "completion": completion.strip()})
    return random.Random(seed).sample(rows, min(n, len(rows)))


def texts_of(rows: list[dict]) -> list[str]:
    """prompt + response text of rows, as hf_dataselect formats them."""
    from hf_dataselect.formatting import detect_format, join_parts

    fmt = detect_format(rows[0].keys())
    return [join_parts(*fmt.prompt_response(row)) for row in rows]
