"""SAE-SimScale: equal to the quadratic definition (also with stop latents), never keeps a pair at or above δ,
exact budget with δ found automatically (also when a sample brackets it first), deterministic."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from hf_dataselect.errors import InputError
from hf_dataselect.selection import sae_simscale
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


def without_stop_latents(rows, values, max_latent_frequency):
    """Rows (and values) without the latents active in more than that fraction of the rows."""
    if max_latent_frequency is None:
        return rows, values
    counts = Counter(latent for row in rows for latent in row)
    keep = [
        [k for k, latent in enumerate(row) if counts[latent] <= max_latent_frequency * len(rows)]
        for row in rows
    ]
    return [[row[k] for k in ks] for row, ks in zip(rows, keep, strict=True)], [
        [v[k] for k in ks] for v, ks in zip(values, keep, strict=True)
    ]


def brute_walk(order, rows, values, delta, budget, kind):
    """Walk ``order``; keep a row if its similarity to every kept row is below δ.

    A cosine within 1e-9 of δ is a tie that floating point cannot decide (two identical rows have cosine 1 in
    exact arithmetic, 0.9999999999999999 here): hypothesis discards such an instance."""
    if delta <= 0:
        return order[:1]
    kept = []
    for i in order:
        if len(kept) == budget:
            break
        sims = [brute_similarity(rows, values, i, j, kind) for j in kept]
        if kind == "cosine" and any(abs(sim - delta) <= 1e-9 for sim in sims):
            reject()
        if all(sim < delta for sim in sims):
            kept.append(i)
    return kept


def brute_simscale(rows, values, delta, budget, kind, max_latent_frequency=None):
    """The definition: walk by |A| desc (then position), the similarity computed without the stop latents."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    return brute_walk(order, *without_stop_latents(rows, values, max_latent_frequency), delta, budget, kind)


@st.composite
def instances(draw):
    n = draw(st.integers(1, 40))
    latents = draw(st.integers(1, 16))
    rows = [sorted(draw(st.sets(st.integers(0, latents - 1), max_size=min(latents, 8)))) for _ in range(n)]
    values = [draw(st.lists(st.floats(0.05, 4.0), min_size=len(r), max_size=len(r))) for r in rows]
    delta = draw(st.sampled_from([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0, 1.5]))
    kind = draw(st.sampled_from(["jaccard", "cosine"]))
    stop = draw(st.sampled_from([None, None, 0.1, 0.25, 0.5, 0.75, 1.0]))
    return rows, values, latents, delta, draw(st.integers(1, n)), kind, stop


@settings(max_examples=400, deadline=None)
@given(instances(), st.sampled_from([1, 3, None]))
def test_pass_equals_the_quadratic_definition(instance, block):
    rows, values, latents, delta, budget, kind, stop = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    walk = simscale_pass(SimScaleIndex.build(features, kind, stop), delta, budget, block=block)
    assert walk.positions.tolist() == brute_simscale(rows, values, delta, budget, kind, stop)


@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from([4, 9, None]), st.integers(1, 6), st.integers(1, 30))
def test_probe_threads_change_nothing(instance, block, segment, chunk):
    # blocks split between threads, each thread scoring its rows against many small index segments
    rows, values, latents, delta, budget, kind, stop = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    index = SimScaleIndex.build(features, kind, stop)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sae_simscale, "_SEGMENT_ENTRIES", segment)
        patch.setattr(sae_simscale, "_CHUNK_POSTINGS", chunk)
        serial = simscale_pass(index, delta, budget, block=block, num_threads=1)
        threaded = simscale_pass(index, delta, budget, block=block, num_threads=3)
    assert threaded.positions.tolist() == serial.positions.tolist()
    assert threaded.positions.tolist() == brute_simscale(rows, values, delta, budget, kind, stop)
    assert np.array_equal(threaded.max_similarity, serial.max_similarity)
    assert (threaded.candidate_pairs, threaded.verified_pairs) == (
        serial.candidate_pairs,
        serial.verified_pairs,
    )


@settings(max_examples=200, deadline=None)
@given(instances(), st.sampled_from([4, 9, None]), st.integers(1, 6), st.integers(1, 30))
def test_dropping_pairs_that_cannot_reach_delta_changes_nothing(instance, block, segment, chunk):
    # the probe drops candidate pairs whose upper bound is below δ before scoring them; the reference keeps them
    rows, values, latents, delta, budget, kind, stop = instance
    index = SimScaleIndex.build(SparseFeatures.from_lists(rows, values, num_latents=latents), kind, stop)
    at = sae_simscale._Bounds.at.__func__

    def keeping_every_pair(cls, index, delta):
        return dataclasses.replace(at(cls, index, delta), filtering=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sae_simscale, "_SEGMENT_ENTRIES", segment)
        patch.setattr(sae_simscale, "_CHUNK_POSTINGS", chunk)
        dropped = simscale_pass(index, delta, budget, block=block)
        patch.setattr(sae_simscale._Bounds, "at", classmethod(keeping_every_pair))
        kept = simscale_pass(index, delta, budget, block=block)
    assert dropped.positions.tolist() == kept.positions.tolist()
    assert np.array_equal(dropped.max_similarity, kept.max_similarity)
    assert (dropped.candidate_pairs, dropped.verified_pairs) == (kept.candidate_pairs, kept.verified_pairs)


def test_one_pass_sparse_product_equals_scipy():
    import scipy.sparse

    rng = np.random.default_rng(0)
    buffers = sae_simscale._ProductBuffers()
    shapes = [(40, 300, 60, 0.05), (3, 300, 5, 0.01), (25, 50, 70, 0.3), (0, 10, 4, 0.5), (6, 10, 0, 0.5)]
    for rows, inner, columns, density in shapes * 2:  # the second round reuses grown buffers
        left = scipy.sparse.random_array(
            (rows, inner), density=density, rng=rng, format="csr", dtype=np.float32
        )
        right = scipy.sparse.random_array((inner, columns), density=density, rng=rng, format="csr")
        left, right = (sae_simscale._csr(m.data, m.indices, m.indptr, m.shape) for m in (left, right))
        expected = (left @ right).toarray()
        tight = int((left @ right).nnz)  # the bound may be exact
        for bound in (tight, rows * columns):
            product = sae_simscale._sparse_product(left, right, bound, buffers)
            assert product.dtype == expected.dtype
            assert np.array_equal(product.toarray(), expected)
    wide = scipy.sparse.csr_array(np.eye(3, dtype=np.float32))
    wide.indices, wide.indptr = wide.indices.astype(np.int64), wide.indptr.astype(np.int64)
    assert np.array_equal(sae_simscale._sparse_product(wide, wide, 9, buffers).toarray(), np.eye(3))
    left = sae_simscale._csr(
        np.ones(4, dtype=np.float32), np.array([0, 2, 1, 2]), np.array([0, 2, 4]), (2, 3)
    )
    right = sae_simscale._csr(
        np.full(3, 2, dtype=np.float32), np.array([1, 0, 1]), np.array([0, 1, 2, 3]), (3, 2)
    )
    with pytest.MonkeyPatch.context() as patch:  # scipy without the private kernel: its public product
        patch.setattr(scipy.sparse, "_sparsetools", None)
        product = sae_simscale._sparse_product(left, right, 4, buffers)
    assert np.array_equal(product.toarray(), [[0, 4], [2, 2]])


def test_balanced_parts_cover_the_block_in_order():
    sizes = np.array([5, 1, 1, 1, 1, 5, 2, 2, 2, 0])
    parts = sae_simscale._balanced_parts(sizes, 3)
    assert parts[0][0] == 0 and parts[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert [int(sizes[a:b].sum()) for a, b in parts] == [7, 7, 6]
    assert sae_simscale._balanced_parts(sizes[:3], 2) == [(0, 3)]  # too few rows to split


def test_threads_must_be_a_positive_integer():
    index = SimScaleIndex.build(SparseFeatures.from_lists([[0], [1]], num_latents=2))
    with pytest.raises(InputError, match="num_threads must be a positive integer"):
        simscale_pass(index, 0.5, 1, num_threads=0)


@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from([1, 3, None]), st.integers(1, 6), st.integers(1, 30))
def test_pass_is_the_same_with_tiny_index_segments_and_probe_chunks(instance, block, segment, chunk):
    # many segments (rows in conflict skip the later ones), many small sparse products per block
    rows, values, latents, delta, budget, kind, stop = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sae_simscale, "_SEGMENT_ENTRIES", segment)
        patch.setattr(sae_simscale, "_CHUNK_POSTINGS", chunk)
        patch.setattr(sae_simscale, "_LOOKUP_ENTRIES", chunk)
        patch.setattr(sae_simscale, "_TAIL_ROWS", segment)  # cosine tail norms in chunks of a few rows
        walk = simscale_pass(SimScaleIndex.build(features, kind, stop), delta, budget, block=block)
    assert walk.positions.tolist() == brute_simscale(rows, values, delta, budget, kind, stop)


@settings(max_examples=200, deadline=None)
@given(instances(), st.integers(0, 40), st.integers(0, 3))
def test_auto_delta_hits_the_budget_and_no_kept_pair_reaches_delta(instance, sample_size, seed):
    rows, values, latents, _, budget, kind, stop = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    sample = sample_size if 0 < sample_size < len(rows) else None
    outcome = simscale(
        features, budget, similarity=kind, max_latent_frequency=stop, sample_size=sample, seed=seed
    )
    kept = outcome.final.positions.tolist()
    assert len(kept) == budget and len(set(kept)) == budget
    delta = outcome.final.delta
    # the result is the full pass at the δ found, whatever the sample suggested
    assert kept == brute_simscale(rows, values, delta, budget, kind, stop)
    filtered_rows, filtered_values = without_stop_latents(rows, values, stop)
    for a in range(len(kept)):
        for b in range(a):
            assert brute_similarity(filtered_rows, filtered_values, kept[a], kept[b], kind) < delta
    # the reported max similarity is the true maximum whenever some earlier pick is a candidate
    for rank, row in enumerate(kept):
        truth = max(
            (brute_similarity(filtered_rows, filtered_values, row, kept[j], kind) for j in range(rank)),
            default=0.0,
        )
        assert outcome.final.max_similarity[rank] <= truth + 1e-12
    assert bool(outcome.sample_steps) == (sample is not None and sample >= 2 and budget > 1)
    again = simscale(
        features, budget, similarity=kind, max_latent_frequency=stop, sample_size=sample, seed=seed
    )
    assert again.final.positions.tolist() == kept
    assert [step["delta"] for step in again.steps] == [step["delta"] for step in outcome.steps]


@settings(max_examples=100, deadline=None)
@given(instances(), st.data())
def test_a_sample_index_is_the_pool_index_restricted_to_the_sample(instance, data):
    rows, values, latents, delta, budget, kind, stop = instance
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    walk_rows = np.array(
        sorted(data.draw(st.sets(st.integers(0, len(rows) - 1), min_size=1))), dtype=np.int64
    )
    index = SimScaleIndex.build(features, kind, stop)
    sample = index.take(walk_rows)
    pool_rows = index.order[walk_rows].tolist()  # the sample keeps the pool's walk order and stop latents
    room = min(budget, len(walk_rows))
    walk = simscale_pass(sample, delta, room)
    assert walk.positions.tolist() == brute_walk(
        pool_rows, *without_stop_latents(rows, values, stop), delta, room, kind
    )


@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from([-0.5, -0.1, 0.0, 0.1, 0.3, 0.6]), st.data())
def test_cosine_with_negative_values_follows_the_definition(instance, delta, data):
    # negative activations make negative cosines possible, so even δ <= 0 can accept several rows; checked as
    # the definition up to float rounding: a kept row is below δ to every earlier kept row, a skipped row not
    rows, _, latents, _, budget, _, stop = instance
    values = [[v * data.draw(st.sampled_from([-1.0, 1.0])) for v in row] for row in instance[1]]
    features = SparseFeatures.from_lists(rows, values, num_latents=latents)
    kept = simscale_pass(SimScaleIndex.build(features, "cosine", stop), delta, budget).positions.tolist()
    filtered_rows, filtered_values = without_stop_latents(rows, values, stop)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    walked = order[: order.index(kept[-1]) + 1] if len(kept) == budget else order
    assert kept == [i for i in walked if i in kept]
    for i in walked:
        earlier = kept[: kept.index(i)] if i in kept else [j for j in kept if order.index(j) < order.index(i)]
        sims = [brute_similarity(filtered_rows, filtered_values, i, j, "cosine") for j in earlier]
        if i in kept:
            assert all(sim < delta + 1e-9 for sim in sims)
        else:
            assert any(sim >= delta - 1e-9 for sim in sims)


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


def test_nonpositive_delta_on_negative_cosines():
    # row order: 0 (3 latents), 1, 2 (2 latents); cos(1, 0) = -1/√3 < 0, cos(2, 0) = 0 (no shared latent)
    features = SparseFeatures.from_lists(
        [[0, 1, 2], [0, 3], [4, 5]], [[1.0, 1.0, 1.0], [-1.5, 0.0], [1.0, 1.0]]
    )
    index = SimScaleIndex.build(features, "cosine")
    assert simscale_pass(index, 0.0, 3).positions.tolist() == [0, 1]
    assert simscale_pass(index, -0.6, 3).positions.tolist() == [0]
    nonnegative = SimScaleIndex.build(SparseFeatures.from_lists([[0], [1]], [[1.0], [1.0]]), "cosine")
    assert simscale_pass(nonnegative, 0.0, 2).positions.tolist() == [0]


def test_empty_rows_count_as_identical():
    features = SparseFeatures.from_lists([[0], [], [], [1]])
    assert simscale(features, 3, delta=0.5).final.positions.tolist() == [0, 3, 1]
    with pytest.raises(InputError):
        simscale(features, 4, delta=0.5)


def test_cosine_needs_values():
    with pytest.raises(InputError, match="values"):
        SimScaleIndex.build(SparseFeatures.from_lists([[0]]), "cosine")


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
    # J(row 0, row 1) = 3/5; latent 0 is in 3 of the 5 rows, and without it J = 2/4 < 0.6
    assert select(_pool(), "sae-simscale", budget=3, delta=0.6).positions.tolist() == [0, 2, 3]
    stopped = select(_pool(), "sae-simscale", budget=3, delta=0.6, max_latent_frequency=0.5)
    assert stopped.positions.tolist() == [0, 1, 2] and stopped.info["stop_latents"] == 1
    sampled = select(_pool(), "sae-simscale", budget=3, delta_sample_size=2, seed=3)
    assert sampled.positions.tolist() == result.positions.tolist() and sampled.info["sample_passes"]
    assert (result.save(tmp_path / "out") / "coverage_curve.png").is_file()


def test_select_sae_simscale_bad_options():
    from hf_dataselect import select

    with pytest.raises(InputError, match="similarity"):
        select(_pool(), "sae-simscale", budget=2, similarity="dice")
    with pytest.raises(InputError, match="delta must be a number"):
        select(_pool(), "sae-simscale", budget=2, delta="high")
    with pytest.raises(InputError, match="delta_tolerance"):
        select(_pool(), "sae-simscale", budget=2, delta_tolerance=0)
    for bad in (0, 1.5, -0.1, True, "often"):
        with pytest.raises(InputError, match="max_latent_frequency"):
            select(_pool(), "sae-simscale", budget=2, max_latent_frequency=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match="delta_sample_size"):
            select(_pool(), "sae-simscale", budget=2, delta_sample_size=bad)
