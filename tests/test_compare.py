"""``hf-dataselect compare`` on a small pool with known labels and precomputed columns (no model runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_dataselect.cli import main as cli_main


def _write_pool(path):
    rows = []
    long_answer = "a long answer " * 30
    for _ in range(4):  # four exact copies of the longest row: label "dup"
        rows.append(
            {
                "prompt": "Repeat the long instruction",
                "completion": long_answer,
                "label": "dup",
                "embedding": [1.0, 0.0, 0.0, 0.0],
                "sae_indices": list(range(10)),
                "sae_values": [1.0] * 10,
            }
        )
    for k, label in enumerate(["a", "b"]):
        for i in range(4):
            vector = [0.0, 0.0, 0.0, 0.0]
            vector[1 + k] = 1.0
            vector[3] = 0.3 * i
            rows.append(
                {
                    "prompt": f"question {label}{i}",
                    "completion": f"short {label}{i}",
                    "label": label,
                    "embedding": vector,
                    "sae_indices": [10 + 10 * k + i, 30 + 10 * k + i, 50 + k],
                    "sae_values": [2.0, 1.0, 0.5],
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_reports_every_method(tmp_path, monkeypatch, capsys):
    import hf_dataselect.selection as selection

    seen_columns = []
    original = selection.select

    def recording_select(dataset, method, budget, **kwargs):
        seen_columns.append(list(dataset.column_names))
        return original(dataset, method, budget, **kwargs)

    monkeypatch.setattr(selection, "select", recording_select)
    pool = _write_pool(tmp_path / "pool.jsonl")
    out = tmp_path / "cmp"
    code = cli_main(
        [
            "compare",
            str(pool),
            "--methods",
            "random,longest,kcenter,kmq,sae-greedy,sae-simscale",
            "--budget",
            "3",
            "--label-column",
            "label",
            "--clusters",
            "3",
            "--option",
            "kmq:k=3",
            "--output",
            str(out),
            "--interpret",
        ]
    )
    assert code == 0
    assert all("label" not in columns for columns in seen_columns) and len(seen_columns) == 6
    report = json.loads((out / "compare.json").read_text())
    methods = report["methods"]
    assert list(methods) == ["random", "longest", "kcenter", "kmq", "sae-greedy", "sae-simscale"]
    assert all(m["rows"] == 3 for m in methods.values())
    longest = methods["longest"]
    assert longest["labels"]["covered"] == 1 and longest["exact_duplicate_share"] == 1.0
    assert longest["near_duplicate_share"] == 1.0 and longest["labels"]["entropy_bits"] == 0.0
    greedy = methods["sae-greedy"]
    # the 10-latent "dup" row, then a0 and b0 (3 new latents each; a1 would add only 2): every label once
    assert greedy["labels"]["covered"] == 3 and greedy["exact_duplicate_share"] == 0.0
    assert greedy["feature_coverage"]["covered"] == 16
    assert report["label_counts"]["longest"] == {"dup": 3}
    assert report["pool_label_counts"] == {"dup": 4, "a": 4, "b": 4}
    assert report["pool"]["reference_clusters"] == 3
    for name in ("compare.md", "coverage_curves.png", "label_distribution.png", "summary.png"):
        assert (out / name).is_file()
    assert (out / "interpretation" / "sae-greedy.md").is_file()
    table = capsys.readouterr().out
    assert "sae-greedy" in table and "labels" in table


def test_compare_cache_reuses_the_prepared_pool(tmp_path):
    pool = _write_pool(tmp_path / "pool.jsonl")
    args = [
        "compare",
        str(pool),
        "--methods",
        "random",
        "--budget",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert cli_main([*args, "--output", str(tmp_path / "one"), "--no-figures"]) == 0
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "dataset_info.json").is_file()
    assert cli_main([*args, "--output", str(tmp_path / "two"), "--no-figures"]) == 0
    one = json.loads((tmp_path / "one" / "compare.json").read_text())["methods"]["random"]
    two = json.loads((tmp_path / "two" / "compare.json").read_text())["methods"]["random"]
    one.pop("seconds"), two.pop("seconds")
    assert one == two


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-column", "nope"], "--label-column 'nope' not found"),
        (["--methods", "random,magic"], "Unknown selection method 'magic'"),
        (["--methods", "deita"], "deita needs quality_column"),
        (["--option", "kmq:k=2"], "not in --methods"),
    ],
)
def test_compare_bad_input_fails_before_work(tmp_path, capsys, extra, message):
    pool = _write_pool(tmp_path / "pool.jsonl")
    out = tmp_path / "cmp"
    args = ["compare", str(pool), "--methods", "random", "--budget", "2", "--output", str(out)]
    code = cli_main(args + extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_metrics_match_the_selection(tmp_path):
    """The label counts in compare.json are those of the rows the method picked."""
    from hf_dataselect import select
    from hf_dataselect.data import load_pool

    pool_path = _write_pool(tmp_path / "pool.jsonl")
    out = tmp_path / "cmp"
    assert (
        cli_main(
            [
                "compare",
                str(pool_path),
                "--methods",
                "sae-greedy",
                "--budget",
                "5",
                "--label-column",
                "label",
                "--output",
                str(out),
                "--no-figures",
            ]
        )
        == 0
    )
    report = json.loads((out / "compare.json").read_text())
    pool = load_pool(pool_path)
    positions = select(pool.remove_columns("label"), "sae-greedy", 5).positions
    labels = np.array(pool["label"])[positions].tolist()
    assert report["label_counts"]["sae-greedy"] == {k: labels.count(k) for k in set(labels)}
