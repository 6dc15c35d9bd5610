"""The `perplexity` baseline: exact bands on small fixtures, computing the column, errors."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_dataselect.errors import InputError
from hf_dataselect.selection import select
from hf_dataselect.selection.perplexity import band_positions


def test_bands_with_ties():
    values = np.array([5.0, 1.0, 3.0, 1.0, 9.0, 3.0, 7.0])
    assert band_positions(values, 3, "low").tolist() == [1, 3, 2]  # ties: lower position first
    assert band_positions(values, 3, "high").tolist() == [4, 6, 0]
    # ascending order is 1,3,2,5,0,6,4; the middle 3 of 7 start at rank (7 - 3) // 2 = 2
    assert band_positions(values, 3, "middle").tolist() == [2, 5, 0]
    assert band_positions(values, 7, "middle").tolist() == [1, 3, 2, 5, 0, 6, 4]


def test_select_with_an_existing_column():
    pool = Dataset.from_dict(
        {"text": [f"row {i}" for i in range(10)], "perplexity": [float(v) for v in range(10, 0, -1)]}
    )
    result = select(pool, "perplexity", budget=3, band="low")
    assert result.positions.tolist() == [9, 8, 7]
    assert result.scores["perplexity"].tolist() == [1.0, 2.0, 3.0]
    assert select(pool, "perplexity", budget=2, band="high").positions.tolist() == [0, 1]
    assert select(pool, "perplexity", budget=4, band="middle").positions.tolist() == [6, 5, 4, 3]


def test_select_computes_the_column_with_a_reference_model(tiny_llama_path):
    from hf_dataselect.transforms.quality import PerplexityScores

    pool = Dataset.from_dict(
        {
            "prompt": ["Say hi", "Add 2 and 2", "Name a colour", "Count to three"],
            "completion": ["hi", "4", "blue, or maybe a long story about the sea", "one two three"],
        }
    )
    result = select(pool, "perplexity", budget=2, band="high", model=str(tiny_llama_path))
    measured = np.asarray(pool.map(PerplexityScores(str(tiny_llama_path)), batched=True)["perplexity"])
    assert result.positions.tolist() == np.lexsort((np.arange(4), -measured))[:2].tolist()
    assert "perplexity" in result.pool.column_names


def test_errors():
    pool = Dataset.from_dict({"text": ["a", "b", "c"]})
    with pytest.raises(InputError, match="pass model="):
        select(pool, "perplexity", budget=2)
    with pytest.raises(InputError, match="band must be one of"):
        select(pool.add_column("perplexity", [1.0, 2.0, 3.0]), "perplexity", budget=2, band="top")
    with pytest.raises(InputError, match="must be numeric"):
        select(pool.add_column("perplexity", ["x", "y", "z"]), "perplexity", budget=2)
