import json
import subprocess
import sys

import numpy as np
import pytest

from hf_dataselect.cli import COMMANDS, main


@pytest.fixture
def pool_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        rows.append(
            {
                "id": f"row-{i}",
                "prompt": f"Question number {i} about topic {i % 4}",
                "completion": " ".join(["answer"] * (i % 9 + 1)),
                "quality": float(i % 5),
                "embedding": rng.normal(size=6).round(4).tolist(),
            }
        )
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_select_end_to_end(pool_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("select", pool_file, "--method", "kmq", "--budget", "8", "--k", "4", "--output", out) == 0
    printed = capsys.readouterr().out
    assert "rows in       40" in printed and "rows out      8" in printed and "clusters      4" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget"] == 8 and manifest["options"]["k"] == 4
    assert len((out / "selected.jsonl").read_text().splitlines()) == 8
    assert all(r["row_id"].startswith("row-") for r in manifest["selection"])


def test_select_fraction_options_and_config_file(pool_file, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("method: kmq\nbudget: 0.25\nk: 2\nseed: 7\n")
    out = tmp_path / "out"
    assert (
        run_cli("select", pool_file, "--config", config, "--option", "variant=closest", "--output", out) == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget"] == 10 and manifest["seed"] == 7 and manifest["options"]["variant"] == "closest"
    # a flag on the command line overrides the file
    out2 = tmp_path / "out2"
    assert run_cli("select", pool_file, "--config", config, "--budget", "3", "--output", out2) == 0
    assert json.loads((out2 / "manifest.json").read_text())["budget"] == 3


def test_selection_is_reproducible_from_the_cli(pool_file, tmp_path):
    for name in ("a", "b"):
        assert (
            run_cli(
                "select",
                pool_file,
                "--method",
                "random",
                "--budget",
                "5",
                "--seed",
                "3",
                "--output",
                tmp_path / name,
            )
            == 0
        )
    positions = [
        [r["position"] for r in json.loads((tmp_path / n / "manifest.json").read_text())["selection"]]
        for n in ("a", "b")
    ]
    assert positions[0] == positions[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], "at least 1 row"),
        (["--budget", "41"], "larger than the pool (40 rows)"),
        (["--budget", "ten"], "--budget must be a row count"),
        (["--method", "nope"], "Unknown selection method 'nope'"),
        (["--option", "bogus=1"], "has no option(s) ['bogus']"),
        (["--k", "100"], "k=100 clusters is larger than the pool"),
        (["--quality-column", "prompt"], "must be numeric"),
        (["--prompt-column", "missing"], "not found"),
    ],
)
def test_bad_input_exits_2_without_output(pool_file, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("select", pool_file, "--output", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pool.jsonl"]


def test_bad_files(tmp_path, capsys):
    assert run_cli("select", tmp_path / "missing.jsonl", "--output", tmp_path / "o") == 2
    assert "No such file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert run_cli("select", broken, "--output", tmp_path / "o") == 2
    assert "Could not read" in capsys.readouterr().err
    unknown = tmp_path / "rows.txt2"
    unknown.write_text("x")
    assert run_cli("select", unknown, "--output", tmp_path / "o") == 2
    assert "Unknown file type" in capsys.readouterr().err
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"a": 1}\n{"a": 2}\n')
    assert run_cli("select", no_text, "--method", "kcenter", "--budget", "1", "--output", tmp_path / "o") == 2
    assert "Cannot tell how to read rows with columns ['a']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_protected(pool_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    assert run_cli("select", pool_file, "--method", "random", "--budget", "2", "--output", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").exists()


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in COMMANDS)
    assert main(["frobnicate"]) == 2


def test_select_help_is_complete():
    completed = subprocess.run(
        [sys.executable, "-m", "hf_dataselect.cli", "select", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--data",
        "--split",
        "--dataset-config",
        "--prompt-column",
        "--response-column",
        "--method",
        "--budget",
        "--seed",
        "--output",
        "--overwrite",
        "--k",
        "--quality-column",
        "--temperature",
        "--embedding-model",
        "--sae",
        "--hookpoint",
        "--threshold",
        "--option",
        "--config",
    ):
        assert flag in completed.stdout, flag


def test_console_script_exit_code(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_dataselect.cli",
            "select",
            str(tmp_path / "nothing.csv"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("error: No such file")


def test_demo_command_writes_the_pool(tmp_path):
    out = tmp_path / "demo.jsonl"
    assert run_cli("demo", "--output", out, "--rows", "50") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and {"instruction", "input", "output", "rating", "task"} <= set(rows[0])
    assert run_cli("demo", "--output", out) == 2  # exists, no --overwrite


def test_config_file_can_turn_off_a_boolean_that_defaults_to_true(tmp_path):
    from dataclasses import dataclass, field

    from hf_dataselect.commands._parser import make_parser

    @dataclass
    class Flags:
        figures: bool = field(default=True, metadata={"help": "draw figures"})

    config = tmp_path / "c.yaml"
    config.write_text("figures: false\n")
    (flags,) = make_parser("t", "test", [Flags]).parse_with_config(["--config", str(config)])
    assert flags.figures is False
    (flags,) = make_parser("t", "test", [Flags]).parse_with_config(
        ["--config", str(config), "--figures", "true"]
    )
    assert flags.figures is True


def test_help_states_each_default_once():
    from dataclasses import dataclass, field

    from hf_dataselect.commands._parser import make_parser

    @dataclass
    class Flags:
        model: str | None = field(default=None, metadata={"help": "Encoder (default: the offline MiniLM)."})
        rows: int = field(default=7, metadata={"help": "Rows to read."})

    text = " ".join(make_parser("t", "test", [Flags]).format_help().split())
    assert "Encoder (default: the offline MiniLM)." in text
    assert "(default: None)" not in text
    assert "Rows to read. (default: 7)" in text


def test_unknown_flag_is_a_usage_error_not_a_traceback(pool_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="unrecognized arguments: --input x"):
        run_cli("select", pool_file, "--output", tmp_path / "out", "--input", "x")
    assert "usage: " in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
