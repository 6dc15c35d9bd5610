import json

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from hf_dataselect import select
from hf_dataselect.cluster import KMeans
from hf_dataselect.errors import InputError


def small_pool(n=30):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return Dataset.from_dict(
        {
            "instruction": [f"Do task {i}" for i in range(n)],
            "output": [f"Result {i}" for i in range(n)],
            "embedding": x.tolist(),
        }
    )


def test_save_writes_rows_manifest_figure_and_centroids(tmp_path):
    pool = small_pool()
    result = select(pool, "kmq", 6, seed=2, k=3)
    out = result.save(tmp_path / "sel")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "centroids.safetensors",
        "cluster_sizes.png",
        "manifest.json",
        "selected",
        "selected.jsonl",
    ]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "kmq" and manifest["budget"] == 6 and manifest["seed"] == 2
    assert manifest["options"]["k"] == 3
    assert manifest["input"]["fingerprint"] == pool._fingerprint
    assert manifest["input"]["rows"] == 30
    assert manifest["library_version"]
    assert manifest["info"]["clustering"]["k"] == 3
    assert [r["position"] for r in manifest["selection"]] == result.positions.tolist()
    assert [r["cluster"] for r in manifest["selection"]] == result.scores["cluster"].tolist()

    rows = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [pool[int(p)]["instruction"] for p in result.positions]
    assert "embedding" not in rows[0]
    assert [r["_row_id"] for r in rows] == result.row_ids
    assert load_from_disk(str(out / "selected"))["instruction"] == [r["instruction"] for r in rows]

    centroids = KMeans.load(out / "centroids.safetensors")
    assert centroids.k == 3 and centroids.seed == 2


def test_row_ids_are_content_based_and_survive_reordering():
    pool = small_pool()
    ids = select(pool, "random", 30, seed=0).row_ids
    reversed_pool = pool.select(list(range(29, -1, -1)))
    reversed_ids = select(reversed_pool, "random", 30, seed=0).row_ids
    by_text = dict(zip(pool["instruction"], select(pool, "random", 30).row_ids, strict=True))
    assert by_text == dict(
        zip(reversed_pool["instruction"], select(reversed_pool, "random", 30).row_ids, strict=True)
    )
    assert len(set(ids)) == 30 and set(ids) == set(reversed_ids)


def test_row_ids_use_an_id_column_and_disambiguate_duplicates():
    pool = Dataset.from_dict({"text": ["same", "same", "other"], "uid": ["a", "b", "c"]})
    assert sorted(select(pool, "random", 3).row_ids) == ["a", "b", "c"]
    no_ids = Dataset.from_dict({"text": ["same", "same", "other"]})
    ids = select(no_ids, "random", 3).row_ids
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "-2"


def test_save_refuses_non_empty_folder_and_keeps_it(tmp_path):
    target = tmp_path / "sel"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    result = select(small_pool(), "random", 5)
    with pytest.raises(InputError, match="not empty"):
        result.save(target)
    assert (target / "keep.txt").read_text() == "precious"
    result.save(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "manifest.json").exists()


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import hf_dataselect.selection.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_figures", broken)
    result = select(small_pool(), "kmq", 5, k=2)
    with pytest.raises(RuntimeError, match="disk full"):
        result.save(tmp_path / "sel")
    assert list(tmp_path.iterdir()) == []
    # an existing selection survives a failed overwrite untouched
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError):
        result.save(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "manifest.json").read_text() == "{}"


def test_dataset_property_and_new_columns():
    result = select(small_pool(), "kmq", 4, k=2)
    assert "cluster" in result.pool.column_names and "cluster_distance" in result.pool.column_names
    assert result.dataset["instruction"] == [result.pool[int(p)]["instruction"] for p in result.positions]
    assert result.summary() == {
        "method": "kmq",
        "rows_in": 30,
        "rows_out": 4,
        "seconds": result.summary()["seconds"],
        "clusters": 2,
        "clusters_selected": int(np.count_nonzero(result.info["selected_per_cluster"])),
    }
