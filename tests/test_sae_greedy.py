"""SAE-GreedSelect: exact picks on small fixtures, lazy/inverted == plain greedy, weights, the selector."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.selection.sae_greedy import (
    greedy_coverage,
    plain_greedy_coverage,
    quantize_weights,
    resolve_latent_weights,
)
from hf_dataselect.selection.sparse_features import SparseFeatures

ROWS = [[0, 1, 2], [2, 3], [3, 4, 5, 6], [0], [7], [1, 2]]


@pytest.mark.parametrize("algorithm", ["inverted", "lazy"])
def test_exact_picks_gains_and_rounds(algorithm):
    features = SparseFeatures.from_lists(ROWS)
    outcome = greedy_coverage(features, 6, algorithm=algorithm)
    # row 2 (4 new), row 0 (3 new), row 4 (latent 7); then every gain is 0 -> round 2 with U = ∅:
    # row 1 (|A|=2, gains 2) ties row 5 (gain 2, |A|=2) -> lower position; then row 5 ({1} new), row 3 ({0})
    assert outcome.positions.tolist() == [2, 0, 4, 1, 5, 3]
    assert outcome.gains.tolist() == [4, 3, 1, 2, 1, 1]
    assert outcome.rounds.tolist() == [1, 1, 1, 2, 2, 2]


def test_without_new_rounds_zero_gain_rows_follow_tie_break():
    features = SparseFeatures.from_lists(ROWS)
    outcome = greedy_coverage(features, 6, new_rounds=False)
    # after rows 2, 0, 4 every gain is 0: larger |A| first (rows 1 and 5 have 2), then lower position
    assert outcome.positions.tolist() == [2, 0, 4, 1, 5, 3]
    assert outcome.gains.tolist() == [4, 3, 1, 0, 0, 0]
    assert outcome.rounds.tolist() == [1] * 6


def test_ties_go_to_larger_set_then_lower_position():
    # rows 0 and 1 both add 2 new latents after row 2; row 1 is larger (|A|=3) and wins
    features = SparseFeatures.from_lists([[0, 1], [0, 5, 6], [0, 2, 3, 4]])
    assert greedy_coverage(features, 3).positions.tolist() == [2, 1, 0]
    identical = SparseFeatures.from_lists([[1, 2], [1, 2], [1, 2]])
    assert greedy_coverage(identical, 3).positions.tolist() == [0, 1, 2]


def test_weights_change_the_order():
    features = SparseFeatures.from_lists([[0, 1, 2], [3]])
    assert greedy_coverage(features, 1).positions.tolist() == [0]
    weights = np.array([1.0, 1.0, 1.0, 10.0])
    outcome = greedy_coverage(features, 2, weights=weights)
    assert outcome.positions.tolist() == [1, 0]
    assert outcome.gains.tolist() == [10.0, 3.0]


@st.composite
def instances(draw):
    n = draw(st.integers(1, 25))
    latents = draw(st.integers(1, 12))
    rows = [sorted(draw(st.sets(st.integers(0, latents - 1), max_size=min(latents, 6)))) for _ in range(n)]
    budget = draw(st.integers(1, n))
    weighted = draw(st.booleans())
    weights = (
        np.array(
            draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), min_size=latents, max_size=latents))
        )
        if weighted
        else None
    )
    return rows, latents, budget, weights, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(instances())
def test_lazy_and_inverted_equal_plain_greedy(instance):
    rows, latents, budget, weights, new_rounds = instance
    features = SparseFeatures.from_lists(rows, num_latents=latents)
    expected = plain_greedy_coverage(features, budget, weights=weights, new_rounds=new_rounds)
    for algorithm in ("inverted", "lazy"):
        got = greedy_coverage(features, budget, weights=weights, new_rounds=new_rounds, algorithm=algorithm)
        assert got.positions.tolist() == expected.positions.tolist()
        assert got.rounds.tolist() == expected.rounds.tolist()
        np.testing.assert_array_equal(got.gains, expected.gains)
    assert len(set(expected.positions.tolist())) == budget


@settings(max_examples=100, deadline=None)
@given(instances())
def test_plain_greedy_matches_a_set_based_definition(instance):
    """The reference itself against the textbook loop over Python sets (unweighted)."""
    rows, latents, budget, _, new_rounds = instance
    features = SparseFeatures.from_lists(rows, num_latents=latents)
    covered, chosen, round_gain = set(), [], 0
    while len(chosen) < budget:
        left = [i for i in range(len(rows)) if i not in chosen]
        gains = {i: len(set(rows[i]) - covered) for i in left}
        best = max(gains.values())
        if best == 0 and new_rounds and round_gain > 0:
            covered, round_gain = set(), 0
            continue
        row = min(left, key=lambda i: (-gains[i], -len(rows[i]), i))
        chosen.append(row)
        covered |= set(rows[row])
        round_gain += gains[row]
    assert plain_greedy_coverage(features, budget, new_rounds=new_rounds).positions.tolist() == chosen


def test_quantized_weights_are_integers_with_bounded_keys():
    features = SparseFeatures.from_lists([[0, 1, 2]])
    q = quantize_weights(np.array([0.1, 0.2, 0.3]), features)
    assert q.dtype == np.int64 and q[2] == 2**20 and q[0] == round(2**20 / 3)


def test_latent_weight_sources(tmp_path):
    features = SparseFeatures.from_lists([[0, 1], [2], [0]])
    np.save(tmp_path / "w.npy", np.array([1.0, 2.0, 3.0]))
    (tmp_path / "list.json").write_text(json.dumps([1, 2, 3]))
    (tmp_path / "map.json").write_text(json.dumps({"2": 5.0}))
    (tmp_path / "w.csv").write_text("latent,weight\n1,4\n")
    from safetensors.numpy import save_file

    save_file({"weights": np.array([3.0, 2.0, 1.0])}, str(tmp_path / "w.safetensors"))
    assert resolve_latent_weights(str(tmp_path / "w.npy"), features)[0].tolist() == [1, 2, 3]
    assert resolve_latent_weights(str(tmp_path / "list.json"), features)[0].tolist() == [1, 2, 3]
    assert resolve_latent_weights(str(tmp_path / "map.json"), features)[0].tolist() == [1, 1, 5]
    assert resolve_latent_weights(str(tmp_path / "w.csv"), features)[0].tolist() == [1, 4, 1]
    assert resolve_latent_weights(str(tmp_path / "w.safetensors"), features)[0].tolist() == [3, 2, 1]
    idf, description = resolve_latent_weights("idf", features)
    assert description == "idf" and idf[1] > idf[0]  # latent 1 is rarer than latent 0
    assert resolve_latent_weights(None, features) == (None, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1.0, -1.0, 1.0], "non-negative"),
        ([1.0], "entries"),
        ([[1.0, 2.0, 3.0]], "1-D"),
        ("nope.npy", "no such"),
    ],
)
def test_bad_latent_weights(spec, message):
    features = SparseFeatures.from_lists([[0, 1], [2]])
    with pytest.raises(InputError, match=message):
        resolve_latent_weights(spec, features)


# -- through select() ----------------------------------------------------------------------------------------
def _pool(rows=ROWS):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [f"row {i}" for i in range(len(rows))],
            "completion": ["answer"] * len(rows),
            "sae_indices": rows,
            "sae_values": [[1.0] * len(r) for r in rows],
        }
    )


def test_select_sae_greedy_outputs_and_report(tmp_path):
    from hf_dataselect import select

    result = select(_pool(), "sae-greedy", budget=4, seed=0)
    assert result.positions.tolist() == [2, 0, 4, 1]
    assert result.scores["gain"].tolist() == [4, 3, 1, 2]
    assert result.scores["round"].tolist() == [1, 1, 1, 2]
    assert result.scores["n_active"].tolist() == [4, 3, 1, 2]
    assert result.info["coverage_curve"].tolist() == [4, 7, 8, 8]
    assert result.info["coverage_curve_rows"].tolist() == [1, 2, 3, 4]
    assert len(result.info["coverage_curve_random"]) == 4
    assert result.info["rounds"] == 2 and result.info["latents_covered"] == 8
    folder = result.save(tmp_path / "out")
    assert (folder / "coverage_curve.png").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["selection"][0]["gain"] == 4


def test_select_is_deterministic_and_reads_a_selected_view():
    from hf_dataselect import select

    view = _pool().select([5, 4, 3, 2, 1, 0])  # an index mapping: read through Arrow, not the raw table
    result = select(view, "sae-greedy", budget=2)
    assert result.positions.tolist() == [3, 5]  # rows 2 and 0 of the original pool
    assert select(view, "sae-greedy", budget=2).positions.tolist() == [3, 5]


def test_features_are_computed_when_absent(monkeypatch, caplog):
    import hf_dataselect.transforms.sae_features as sae_features
    from hf_dataselect import select

    calls = {}

    def fake_add_sae_features(dataset, **options):
        calls.update(options)
        return dataset.add_column("sae_indices", ROWS).add_column(
            "sae_values", [[1.0] * len(r) for r in ROWS]
        )

    monkeypatch.setattr(sae_features, "add_sae_features", fake_add_sae_features)
    pool = _pool().remove_columns(["sae_indices", "sae_values"])
    with caplog.at_level(logging.INFO, logger="hf_dataselect.selection"):
        result = select(pool, "sae-greedy", budget=3, sae="auto", threshold=0.5)
    assert result.positions.tolist() == [2, 0, 4]
    assert calls["sae"] == "auto" and calls["threshold"] == 0.5 and calls["model"] is None
    assert "computing SAE features" in caplog.text
    assert "sae_indices" in result.pool.column_names


def test_bad_inputs_fail_before_work():
    from datasets import Dataset

    from hf_dataselect import select

    pool = _pool()
    with pytest.raises(InputError, match="algorithm"):
        select(pool, "sae-greedy", budget=2, algorithm="fast")
    with pytest.raises(InputError, match="latent_weights"):
        select(pool, "sae-greedy", budget=2, latent_weights="/no/such/file.npy")
    strings = Dataset.from_dict({"text": ["a", "b"], "sae_indices": ["x", "y"]})
    with pytest.raises(InputError, match="lists of active latent ids"):
        select(strings, "sae-greedy", budget=1)
    with pytest.raises(InputError, match="features_column"):
        select(pool, "sae-greedy", budget=1, features_column="mine")
    with pytest.raises(InputError, match="not both"):
        select(pool, "sae-greedy", budget=1, threshold=1.0, threshold_quantile=0.5)


# -- the CSR view ----------------------------------------------------------------------------------------------
def test_sparse_features_from_dataset_canonicalises_and_checks():
    from datasets import Dataset

    ds = Dataset.from_dict(
        {"sae_indices": [[3, 1, 3], [], [0, 2]], "sae_values": [[0.5, 2.0, 1.5], [], [1.0, 1.0]]}
    )
    features = SparseFeatures.from_dataset(ds, "sae_indices", "sae_values")
    assert features.indptr.tolist() == [0, 2, 2, 4]
    assert features.indices.tolist() == [1, 3, 0, 2] and features.indices.dtype == np.int32
    assert features.values.tolist() == [2.0, 1.5, 1.0, 1.0]  # the repeated latent 3 keeps its largest value
    assert features.num_latents == 4 and features.sizes.tolist() == [2, 0, 2]
    assert features.coverage_curve(np.array([2, 0, 1])).tolist() == [2, 4, 4]
    assert features.transpose().indptr.tolist() == [0, 1, 2, 3, 4]
    bad = Dataset.from_dict({"sae_indices": [[0, 1]], "sae_values": [[1.0]]})
    with pytest.raises(InputError, match="same length"):
        SparseFeatures.from_dataset(bad, "sae_indices", "sae_values")
    with pytest.raises(InputError, match="non-negative"):
        SparseFeatures.from_lists([[-1, 2]])
    with pytest.raises(InputError, match="outside num_latents"):
        SparseFeatures.from_lists([[0, 9]], num_latents=4)


def test_sparse_features_multi_chunk_column(tmp_path):
    from datasets import Dataset, concatenate_datasets, load_from_disk

    parts = [Dataset.from_dict({"sae_indices": [[i, i + 1]] * 3}) for i in range(3)]
    concatenate_datasets(parts).save_to_disk(str(tmp_path / "pool"), max_shard_size="1KB")
    pool = load_from_disk(str(tmp_path / "pool"))
    features = SparseFeatures.from_dataset(pool.select([8, 0, 4]))
    assert [features.row(i).tolist() for i in range(3)] == [[2, 3], [0, 1], [1, 2]]
