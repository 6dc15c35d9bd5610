"""Interpretation report: latents a selection covers that a random subset of the same size misses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_dataselect.errors import InputError
from hf_dataselect.interpret import explain_coverage, explain_selection
from hf_dataselect.selection.sparse_features import SparseFeatures

# 20 rows: latent 0 is everywhere, latents 10 and 11 only in rows 18 and 19
ROWS = [[0] for _ in range(18)] + [[0, 10, 11], [0, 10]]
VALUES = [[1.0] for _ in range(18)] + [[1.0, 2.0, 5.0], [1.0, 7.0]]
TEXTS = [f"plain row {i}" for i in range(18)] + ["rare row eighteen", "rare row nineteen " + "x" * 300]


def test_gained_latents_and_examples():
    features = SparseFeatures.from_lists(ROWS, VALUES)
    # seed 0's random pair of rows does not include rows 18/19 (checked below), so 10 and 11 are gained
    report = explain_coverage(
        features, np.array([18, 19]), TEXTS, method="sae-greedy", seed=0, snippet_chars=40
    )
    rng = np.random.default_rng([0, 0x1A7E])
    assert not {18, 19} & set(rng.choice(20, size=2, replace=False).tolist())
    assert (report.covered_by_selection, report.covered_by_random, report.gained, report.lost) == (3, 1, 2, 0)
    assert [lat.latent for lat in report.latents] == [10, 11]  # latent 10: in 2 selected rows
    assert [e.position for e in report.latents[0].examples] == [19, 18]  # activation 7 before 2
    assert (
        report.latents[0].examples[0].snippet.endswith("…")
        and len(report.latents[0].examples[0].snippet) == 40
    )
    markdown = report.to_markdown()
    assert "## Latent 10 — in 2 selected rows, 2 rows of the pool" in markdown
    assert "rare row eighteen" in markdown


def test_save_round_trip(tmp_path):
    features = SparseFeatures.from_lists(ROWS)  # no values: examples in pick order
    report = explain_coverage(features, np.array([19, 18]), TEXTS, seed=0)
    assert [e.position for e in report.latents[0].examples] == [19, 18]
    md, js = report.save(tmp_path)
    assert md.read_text() == report.to_markdown()
    assert json.loads(js.read_text())["latents"][0]["latent"] == 10


def test_errors():
    features = SparseFeatures.from_lists(ROWS)
    with pytest.raises(InputError, match="empty"):
        explain_coverage(features, np.array([], dtype=np.int64), TEXTS)
    with pytest.raises(InputError, match="texts has"):
        explain_coverage(features, np.array([1]), TEXTS[:3])


def test_explain_selection_from_a_result():
    from datasets import Dataset

    from hf_dataselect import select

    pool = Dataset.from_dict({"text": TEXTS, "sae_indices": ROWS, "sae_values": VALUES})
    result = select(pool, "sae-greedy", budget=2, seed=0)
    report = explain_selection(result)
    assert report.method == "sae-greedy" and report.gained == 2
    assert report.latents[1].examples[0].snippet == "rare row eighteen"
    plain = select(pool.remove_columns(["sae_indices", "sae_values"]), "random", budget=2)
    with pytest.raises(InputError, match="no 'sae_indices'"):
        explain_selection(plain)
