"""Deita baseline: quality-ordered walk with a cosine ceiling τ, filled to the exact budget."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.selection.deita import deita_select

# unit vectors: rows 0 and 1 are nearly identical, row 2 orthogonal, row 3 close to row 2
VECTORS = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.1, 0.995], [0.7071, 0.7071]], dtype=np.float32)
QUALITY = np.array([5.0, 9.0, 3.0, 4.0, 1.0])


def naive_deita(vectors, quality, budget, tau):
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
    order = sorted(range(len(x)), key=lambda i: (-quality[i], i))
    kept = []
    for i in order:
        if len(kept) == budget:
            break
        if all(float(x[i] @ x[j]) <= tau for j in kept):
            kept.append(i)
    rejected = [i for i in order if i not in kept]
    return kept + rejected[: budget - len(kept)], len(kept)


def test_exact_walk():
    walk = deita_select(VECTORS, QUALITY, 3, tau=0.9)
    # quality order 1, 0, 3, 2, 4: row 0 is a near-copy of row 1 (cos 0.99), row 3 is kept, row 2 ~ row 3
    assert walk.positions.tolist() == [1, 3, 4]
    assert not walk.filled.any()
    assert np.isnan(walk.max_similarity[0])


def test_fill_when_the_walk_ends_short():
    walk = deita_select(VECTORS, QUALITY, 5, tau=0.9)
    assert walk.positions.tolist() == [1, 3, 4, 0, 2]
    assert walk.filled.tolist() == [False, False, False, True, True]
    assert walk.max_similarity[3] == pytest.approx(float(VECTORS[0] @ VECTORS[1]), abs=1e-3)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(0, 10_000), st.sampled_from([0.0, 0.3, 0.8, 0.9, 0.99]))
def test_equals_a_naive_walk(n, seed, tau):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    vectors[rng.random(n) < 0.2] *= 3  # not normalised: cosine is computed anyway
    quality = rng.integers(0, 4, size=n).astype(float)  # many ties
    budget = int(rng.integers(1, n + 1))
    walk = deita_select(vectors, quality, budget, tau)
    expected, kept = naive_deita(vectors, quality, budget, tau)
    assert walk.positions.tolist() == expected
    assert int((~walk.filled).sum()) == kept


def _pool():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [f"p{i}" for i in range(5)],
            "completion": ["c"] * 5,
            "embedding": VECTORS.tolist(),
            "q": QUALITY,
        }
    )


def test_select_deita():
    from hf_dataselect import select

    result = select(_pool(), "deita", budget=4, quality_column="q")
    assert result.positions.tolist() == [1, 3, 4, 0]
    assert result.scores["filled"].tolist() == [False, False, False, True]
    assert result.scores["quality"].tolist() == [9.0, 4.0, 1.0, 5.0]
    assert result.info == {"tau": 0.9, "accepted_by_walk": 3, "filled": 1}


def test_deita_needs_a_quality_column():
    from hf_dataselect import select

    with pytest.raises(InputError, match="quality_column"):
        select(_pool(), "deita", budget=2)
    with pytest.raises(InputError, match=r"not found|needs column"):
        select(_pool(), "deita", budget=2, quality_column="missing")
    with pytest.raises(InputError, match="tau"):
        select(_pool(), "deita", budget=2, quality_column="q", tau="high")
