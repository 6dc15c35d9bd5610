"""SAE-SimScale: equal to the quadratic definition, never keeps a pair at or above δ, exact budget."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.selection.sae_simscale import SimScaleIndex, simscale, simscale_pass
from hf_dataselect.selection.sparse_features import SparseFeatures


def brute_similarity(rows, values, i, j, kind):
    a, b = set(rows[i]), set(rows[j])
    if not a and not b:
        return 1.0
    if kind == "jaccard":
        return len(a & b) / len(a | b)
    va = dict(zip(rows[i], np.asarray(values[i], dtype=np.float32).astype(np.float64), strict=True))
    vb = dict(zip(rows[j], np.asarray(values[j], dtype=np.float32).astype(np.float64), strict=True))
    na, nb = np.sqrt(sum(v * v for v in va.values())), np.sqrt(sum(v * v for v in vb.values()))
    if na == 0 or nb == 0:
        return 0.0
    return sum(va[k] * vb[k] for k in a & b) / (na * nb)


def brute_simscale(rows, values, delta, budget, kind):
    """The definition: walk by |A| desc (then position), keep a row if below δ to every kept row."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    if delta <= 0:
        return order[:1]
    kept = []
    for i in order:
        if len(kept) == budget:
            break
        if all(brute_similarity(rows, values, i, j, kind) < delta for j in kept):
            kept.append(i)
    return kept


@st.composite
def instances(draw):
    n = draw(st.integers(1, 40))
    latents = draw(st.integers(1, 16))
    rows = [sorted(draw(st.sets(st.integers(0, latents - 1), max_size=min(latents, 8)))) for _ in range(n)]
    values = [draw(st.lists(st.floats(0.05, 4.0), min_size=len(r), max_size=len(r))) for r in rows]
    delta = draw(st.sampled_from([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0, 1.5]))
    return rows, values, latents, delta, draw(st.integers(1, n)), draw(st.sampled_from(["jaccard", "cosine"]))


@settings(max_examples=300, deadline=None)
@given(instances(), st.sampled_from([1, 3, None]))
def test_pass_equals_the_quadratic_definition(instance, block):
    rows, values, latents, delta, budget, kind = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    walk = simscale_pass(SimScaleIndex(features, kind), delta, budget, block=block)
    assert walk.positions.tolist() == brute_simscale(rows, values, delta, budget, kind)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_auto_delta_hits_the_budget_and_no_kept_pair_reaches_delta(instance):
    rows, values, latents, _, budget, kind = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    outcome = simscale(features, budget, similarity=kind)
    kept = outcome.final.positions.tolist()
    assert len(kept) == budget and len(set(kept)) == budget
    delta = outcome.final.delta
    for a in range(len(kept)):
        for b in range(a):
            assert brute_similarity(rows, values, kept[a], kept[b], kind) < delta
    # the reported max similarity is the true maximum whenever some earlier pick is a candidate ...
    for rank, row in enumerate(kept):
        truth = max((brute_similarity(rows, values, row, kept[j], kind) for j in range(rank)), default=0.0)
        assert outcome.final.max_similarity[rank] <= truth + 1e-12
    # ... and every pass of the bisection is recorded
    assert outcome.steps[-1]["delta"] in {s["delta"] for s in outcome.steps}


def test_exact_small_selection_and_ties():
    rows = [[0, 1, 2, 3], [0, 1, 2, 4], [5, 6], [7, 8], [0, 5]]
    features = SparseFeatures.from_lists(rows)
    # order: rows 0, 1 (size 4, position), 2, 3, 4 (size 2, position); J(0,1) = 3/5, J(4,0) = 1/5, J(4,2) = 1/3
    assert simscale(features, 3, delta=0.5).final.positions.tolist() == [0, 2, 3]
    assert simscale(features, 4, delta=0.5).final.positions.tolist() == [0, 2, 3, 4]
    assert simscale(features, 5, delta=0.7).final.positions.tolist() == [0, 1, 2, 3, 4]
    sims = simscale(features, 4, delta=0.5).final.max_similarity.tolist()
    assert sims == pytest.approx([0.0, 0.0, 0.0, 1 / 3])


def test_given_delta_that_cannot_reach_the_budget_is_an_input_error():
    features = SparseFeatures.from_lists([[0, 1], [0, 1], [0, 1]])
    with pytest.raises(InputError, match="accepts only 1"):
        simscale(features, 2, delta=0.5)
    # found automatically: identical rows need δ above 1
    outcome = simscale(features, 2)
    assert outcome.final.positions.tolist() == [0, 1] and outcome.final.delta > 1.0


def test_empty_rows_count_as_identical():
    features = SparseFeatures.from_lists([[0], [], [], [1]])
    assert simscale(features, 3, delta=0.5).final.positions.tolist() == [0, 3, 1]
    with pytest.raises(InputError):
        simscale(features, 4, delta=0.5)


def test_cosine_needs_values():
    with pytest.raises(InputError, match="values"):
        SimScaleIndex(SparseFeatures.from_lists([[0]]), "cosine")


def _pool():
    from datasets import Dataset

    rows = [[0, 1, 2, 3], [0, 1, 2, 4], [5, 6], [7, 8], [0, 5]]
    return Dataset.from_dict(
        {
            "text": [f"row {i}" for i in range(len(rows))],
            "sae_indices": rows,
            "sae_values": [[float(k + 1) for k in range(len(r))] for r in rows],
        }
    )


def test_select_sae_simscale(tmp_path):
    from hf_dataselect import select

    result = select(_pool(), "sae-simscale", budget=3, seed=0)
    assert len(result.positions) == 3
    assert result.info["delta_found_by"] == "bisection"
    assert result.info["bisection_steps"] == len(result.info["passes"]) >= 2
    assert (result.scores["max_similarity"] < result.info["delta"]).all()
    given = select(_pool(), "sae-simscale", budget=3, delta=0.5)
    assert given.positions.tolist() == [0, 2, 3] and given.info["delta_found_by"] == "given"
    cosine = select(_pool(), "sae-simscale", budget=2, similarity="cosine")
    assert len(cosine.positions) == 2
    assert (result.save(tmp_path / "out") / "coverage_curve.png").is_file()


def test_select_sae_simscale_bad_options():
    from hf_dataselect import select

    with pytest.raises(InputError, match="similarity"):
        select(_pool(), "sae-simscale", budget=2, similarity="dice")
    with pytest.raises(InputError, match="delta must be a number"):
        select(_pool(), "sae-simscale", budget=2, delta="high")
    with pytest.raises(InputError, match="delta_tolerance"):
        select(_pool(), "sae-simscale", budget=2, delta_tolerance=0)
