"""``hf-dataselect train-sae``: trains, saves a loadable SAE with its card, and reports bad input cleanly."""

from __future__ import annotations

import json

from hf_dataselect.cli import main
from hf_dataselect.sae.model import TopKSAE


def _write_pool(path, n=80):
    words = [
        "the",
        "sea",
        "wind",
        "fox",
        "dog",
        "numbers",
        "poem",
        "sort",
        "translate",
        "answer",
        "code",
        "data",
    ]
    with open(path, "w") as out:
        for i in range(n):
            prompt = " ".join(words[(i + j) % len(words)] for j in range(3 + i % 7))
            out.write(json.dumps({"prompt": prompt, "completion": " ".join(reversed(prompt.split()))}) + "\n")


def test_train_sae_command(tiny_llama_path, tmp_path, capsys):
    _write_pool(tmp_path / "pool.jsonl")
    status = main(
        [
            "train-sae",
            str(tmp_path / "pool.jsonl"),
            "--model", str(tiny_llama_path),
            "--hookpoint", "model.layers.1",
            "--output", str(tmp_path / "sae"),
            "--k", "4",
            "--expansion_factor", "2",
            "--batch_tokens", "128",
            "--epochs", "2",
            "--eval_fraction", "0.1",
            "--license", "mit",
            "--quiet",
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "Saved the SAE for layers.1" in printed and "held-out FVU" in printed
    sae = TopKSAE.from_pretrained(tmp_path / "sae", hookpoint="layers.1")
    assert (sae.d_in, sae.num_latents, sae.k) == (64, 128, 4)
    assert sae.metadata["dataset"] == str(tmp_path / "pool.jsonl") and sae.metadata["license"] == "mit"
    assert 'license: "mit"' in (tmp_path / "sae" / "README.md").read_text()


def test_train_sae_command_input_errors(tmp_path, capsys):
    _write_pool(tmp_path / "pool.jsonl", n=5)
    assert main(["train-sae", str(tmp_path / "pool.jsonl"), "--k", "0"]) == 2
    assert "error: Invalid SAE training options: k must be ≥ 1" in capsys.readouterr().err
    assert main(["train-sae", "--k", "4"]) == 2
    assert "Name the pool to train on" in capsys.readouterr().err
    assert not (tmp_path / "sae").exists()
