"""Selection measures on small inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_dataselect import metrics
from hf_dataselect.selection.sparse_features import SparseFeatures


def test_feature_and_cluster_coverage():
    features = SparseFeatures.from_lists([[0, 1], [1, 2], [3], []], num_latents=6)
    assert metrics.feature_coverage(features, np.array([0, 1])) == {
        "covered": 3,
        "active_in_pool": 4,
        "share": 0.75,
    }
    assert metrics.cluster_coverage(np.array([0, 0, 1, 2]), np.array([0, 1])) == {
        "covered": 1,
        "total": 3,
        "share": pytest.approx(1 / 3),
    }


def test_label_distribution_entropy():
    labels = ["a", "a", "b", "b", "c", "d"]
    out = metrics.label_distribution(labels, np.array([0, 2, 4, 5]))
    assert out["covered"] == 4 and out["total"] == 4
    assert out["entropy_bits"] == pytest.approx(2.0)
    assert out["normalized_entropy"] == pytest.approx(1.0)
    skewed = metrics.label_distribution(labels, np.array([0, 1, 2]))
    assert skewed["entropy_bits"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert skewed["largest_label"] == "a" and skewed["counts"] == {"a": 2, "b": 1}


def test_duplicates():
    texts = ["Hello  world", "hello world", "Hello world", "other"]
    # rows 0 and 2 are the same text once whitespace is collapsed; row 1 differs by case
    assert metrics.exact_duplicate_share(texts, np.array([0, 1, 2, 3])) == 0.5
    assert metrics.exact_duplicate_share(texts, np.array([0, 1])) == 0.0
    vectors = np.array([[1, 0], [0.999, 0.04], [0, 1], [-1, 0]], dtype=np.float32)
    assert metrics.near_duplicate_share(vectors, np.array([0, 1, 2, 3])) == 0.5
    assert metrics.near_duplicate_share(vectors, np.array([0, 2, 3])) == 0.0
    assert metrics.near_duplicate_share(vectors, np.array([0, 1]), threshold=0.9999) == 0.0
    same = np.ones((3, 2), dtype=np.float32)
    assert metrics.nearest_other_similarity(same).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_selection_metrics_and_pearson():
    out = metrics.selection_metrics(
        np.array([0, 1]), texts=["a", "b", "c"], lengths=np.array([2, 4, 100]), clusters=np.array([0, 1, 1])
    )
    assert out == {
        "rows": 2,
        "cluster_coverage": {"covered": 2, "total": 2, "share": 1.0},
        "exact_duplicate_share": 0.0,
        "mean_tokens": 3.0,
    }
    assert metrics.pearson_r(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(1.0)
    assert math.isnan(metrics.pearson_r(np.array([1, 1]), np.array([2, 3])))
