import os
from collections import Counter

from hf_dataselect.demo import FAMILIES, demo_pool, demo_pool_path, demo_rows
from hf_dataselect.formatting import detect_format


def test_demo_pool_is_deterministic_and_structured():
    rows = demo_rows()
    assert rows == demo_rows()
    assert rows != demo_rows(seed=1)
    assert len(rows) == 3000
    assert len({r["id"] for r in rows}) == 3000
    assert set(Counter(r["family"] for r in rows)) == set(FAMILIES)
    assert sum(r["is_near_duplicate"] for r in rows) == 240
    low = [r for r in rows if r["is_low_quality"]]
    assert 250 <= len(low) <= 300
    good = [r for r in rows if not r["is_low_quality"]]
    assert sum(r["rating"] for r in low) / len(low) < sum(r["rating"] for r in good) / len(good) - 3
    assert detect_format(rows[0].keys()).kind == "alpaca"


def test_planted_answers_are_correct_or_flagged():
    for row in demo_rows(400, seed=3):
        if row["is_near_duplicate"]:
            continue
        if row["task"] == "arithmetic/0" and not row["is_low_quality"]:
            a, b = row["instruction"].removeprefix("What is ").rstrip("?").split(" + ")
            assert row["output"] == f"{a} + {b} = {int(a) + int(b)}."
        if row["task"] == "string_edit/0" and not row["is_low_quality"]:
            assert row["output"] == row["input"][::-1]


def test_near_duplicates_copy_an_original():
    rows = demo_rows(500)
    originals = {(r["input"], r["output"], r["task"]) for r in rows if not r["is_near_duplicate"]}
    for row in rows:
        if row["is_near_duplicate"]:
            assert (row["input"], row["output"], row["task"]) in originals


def test_demo_pool_file_is_cached(tmp_path):
    first = demo_pool_path(100, cache_dir=str(tmp_path))
    mtime = os.path.getmtime(first)
    assert demo_pool_path(100, cache_dir=str(tmp_path)) == first
    assert os.path.getmtime(first) == mtime
    assert len(demo_pool(100)) == 100
