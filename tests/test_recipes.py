"""YAML recipes: parsing into the library's dataclasses, overrides, errors, every shipped recipe, one full run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_dataselect.errors import InputError
from hf_dataselect.recipes import Recipe, run_recipe, sft_examples, split_overrides

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CPU_RECIPES = ("kmq_cpu.yaml", "sae_cpu.yaml")

MINIMAL = {
    "selection": {"method": "random", "budget": "10"},
    "run": {"output_dir": "out", "stages": ["select"]},
}


def recipe(data: dict, *overrides: str) -> Recipe:
    return Recipe.from_dict(data, list(overrides), source="test.yaml")


# -- parsing and overrides ---------------------------------------------------------------------------------
def test_sections_parse_into_the_library_dataclasses():
    from trl import ModelConfig

    from hf_dataselect.commands._pool import PoolArguments
    from hf_dataselect.commands.select import SelectArguments

    r = Recipe.from_yaml(RECIPES / "kmq_cpu.yaml")
    assert isinstance(r.pool, PoolArguments) and r.pool.data is None
    assert isinstance(r.selection, SelectArguments) and r.selection.budget == "300"
    assert isinstance(r.model, ModelConfig) and r.model.model_name_or_path == "testing:tiny-llama"
    assert r.training["num_train_epochs"] == 3 and r.training["learning_rate"] == pytest.approx(1e-3)
    assert r.training["use_cpu"] is True and r.training["bf16"] is False
    assert r.iterative["scorer"] == "reward"
    assert r.methods() == ["random", "kmq-random", "kmq", "iterative-kmq"]
    assert r.method_options("kmq")["quality_column"] == "rating"
    assert "quality_column" not in r.method_options("kmq-random")
    config = r.sft_config("somewhere")
    assert config.output_dir == "somewhere" and config.num_train_epochs == 3


def test_command_line_overrides_win_over_the_yaml():
    r = Recipe.from_yaml(
        RECIPES / "kmq_cpu.yaml",
        [
            "--selection.budget",
            "25",
            "--training.learning_rate=0.02",
            "--run.methods",
            "random",
            "kmq",
            "--run.seeds",
            "3",
            "4",
            "--run.method_options",
            "{kmq: {k: 4}}",
            "--evaluation.epochs",
            "1",
            "--model.model_name_or_path",
            "/some/model",
            "--run.figures",
            "false",
        ],
    )
    assert r.selection.budget == "25"
    assert r.training["learning_rate"] == pytest.approx(0.02)
    assert [s.name for s in r.runs()] == [
        "random-25-seed3",
        "random-25-seed4",
        "kmq-25-seed3",
        "kmq-25-seed4",
    ]
    assert r.method_options("kmq") == {"k": 4}
    assert r.evaluation.epochs == [1]
    assert r.model.model_name_or_path == "/some/model"
    assert r.run.figures is False
    # untouched values keep the YAML's
    assert r.training["num_train_epochs"] == 3 and r.evaluation.label_column == "family"


def test_boolean_fields_that_default_to_true_can_be_switched_off_from_yaml():
    r = recipe({**MINIMAL, "run": {**MINIMAL["run"], "figures": False}})
    assert r.run.figures is False
    r = recipe(MINIMAL, "--run.figures", "false")
    assert r.run.figures is False


def test_the_recipe_round_trips_through_yaml():
    original = Recipe.from_yaml(RECIPES / "kmq_cpu.yaml", ["--selection.seed", "7"])
    again = Recipe.from_dict(yaml.safe_load(original.to_yaml()))
    assert again.to_dict() == original.to_dict()
    assert again.selection.seed == 7


def test_split_overrides():
    sections = ["selection", "run"]
    assert split_overrides(["--selection.k", "8", "--run.seeds", "0", "1"], sections) == {
        "selection": ["--k", "8"],
        "run": ["--seeds", "0", "1"],
    }
    assert split_overrides(["--selection.budget=-1"], sections) == {"selection": ["--budget", "-1"]}


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        (
            {**MINIMAL, "selectoin": {}},
            [],
            r"unknown section\(s\) 'selectoin' \(did you mean 'selection'\?\)",
        ),
        (
            {**MINIMAL, "training": {"learning_rat": 1.0}},
            [],
            r"no field 'learning_rat' \(did you mean 'learning_rate'",
        ),
        (MINIMAL, ["--selection.budjet", "5"], r"no field 'budjet' \(did you mean 'budget'"),
        (
            MINIMAL,
            ["--selecton.budget", "5"],
            r"Unknown recipe section 'selecton' \(did you mean 'selection'",
        ),
        (MINIMAL, ["--budget", "5"], "must name a section and a field"),
        (MINIMAL, ["stray"], "Unexpected argument 'stray'"),
        (MINIMAL, ["--training.num_train_epochs", "many"], "invalid float value: 'many'"),
        ({**MINIMAL, "training": {"num_train_epochs": "many"}}, [], "invalid float value: 'many'"),
        ({**MINIMAL, "pool": ["not", "a", "mapping"]}, [], "section 'pool' must be a mapping"),
        ({**MINIMAL, "selection": {"method": "randomm"}}, [], "Unknown selection method 'randomm'"),
        ({**MINIMAL, "selection": {"output": "elsewhere"}}, [], "set by the recipe"),
        ({**MINIMAL, "training": {"output_dir": "x"}}, [], "training.output_dir is set by the recipe"),
        (MINIMAL, ["--run.stages", "select", "deploy"], "run.stages must be a subset"),
        (MINIMAL, ["--run.methods", "random", "random"], "lists a method twice"),
        (MINIMAL, ["--selection.k", "5"], r"option\(s\) \['k'\] are not options of any method"),
        (MINIMAL, ["--run.method_options", "{kmq: {k: 3}}"], "names method"),
        (MINIMAL, ["--run.method_options", "[1, 2]"], "method_options.*expected a YAML mapping"),
        (MINIMAL, ["--selection.budget", "lots"], "must be a row count or a fraction"),
        (MINIMAL, ["--run.stages", "select", "train"], "needs model.model_name_or_path"),
        (MINIMAL, ["--quality.scorer", "vibes"], "quality.scorer must be one of"),
        (MINIMAL, ["--quality.scorer", "reward"], "needs quality.model"),
        (MINIMAL, ["--evaluation.epochs", "1"], "needs evaluation sets"),
        (MINIMAL, ["--run.methods", "iterative-kmq"], "keep 'train' in run.stages"),
    ],
)
def test_bad_recipes_fail_with_a_clear_message(data, overrides, message):
    with pytest.raises(InputError, match=message):
        recipe(data, *overrides)


def test_iterative_section_is_checked_by_the_callback_config():
    data = {
        "selection": {"budget": "12"},
        "run": {"methods": ["iterative-kmq"]},
        "model": {"model_name_or_path": "m"},
        "iterative": {"allocation": "round-robin"},
    }
    with pytest.raises(InputError, match="allocation must be one of"):
        recipe(data)
    with pytest.raises(InputError, match="no field 'budget_per_epoch'"):
        recipe({**data, "iterative": {"budget_per_epoch": 3}})
    ok = recipe({**data, "iterative": {"scorer": "loss"}}, "--iterative.scorer_options", "{batch_size: 2}")
    assert ok.iterative == {"scorer": "loss", "scorer_options": {"batch_size": 2}}
    # with a score column the offline selector runs instead, at selection time
    offline = recipe(
        {**data, "run": {"methods": ["iterative-kmq"], "stages": ["select"]}},
        "--selection.option",
        "score_column=s",
    )
    assert not offline.uses_callback("iterative-kmq")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_builds_its_config_objects(path, tmp_path):
    r = Recipe.from_yaml(path)
    assert r.runs(), "a recipe must run at least one selection"
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())).to_dict() == r.to_dict()
    if r.wants("train"):
        # SFTConfig checks the machine (bf16 needs a GPU unless use_cpu); on a CPU-only CI machine build it as
        # the CPU would, which still checks every field name and value
        cpu = r if path.name in CPU_RECIPES else Recipe.from_yaml(path, ["--training.use_cpu", "true"])
        config = cpu.sft_config(tmp_path)
        assert config.output_dir == str(tmp_path)
    for method in r.methods():
        if r.uses_callback(method):
            assert r.data_selection_config(budget_per_epoch=10, seed=0).budget_per_epoch == 10


def test_testing_models_are_built_once_into_the_cache(tmp_path):
    from hf_dataselect.recipes import resolve_model_path

    folder = resolve_model_path("testing:tiny-llama", cache_dir=tmp_path)
    assert (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("testing:tiny-llama", cache_dir=tmp_path) == folder
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_path("org/model") == "org/model"
    with pytest.raises(InputError, match="Unknown test model"):
        resolve_model_path("testing:giant")


# -- training data agrees with evaluation -------------------------------------------------------------------
@pytest.mark.parametrize("conversational", [True, False])
def test_sft_examples_train_on_exactly_the_tokens_evaluation_scores(
    tiny_llama_path, tmp_path, conversational
):
    """The completion mask SFTTrainer builds equals the response span PairEncoder (evaluation) uses."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hf_dataselect.scoring import PairEncoder

    prompts = ["Add 2 and 3.", "Name a fruit.", "What colour is the sky?"]
    responses = ["5", "An apple.", "Blue, on a clear day."]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    data = sft_examples(
        Dataset.from_dict({"instruction": prompts, "output": responses}), conversational=conversational
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_length=None,
        activation_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_path),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    full, starts = PairEncoder(tokenizer, chat_template=conversational, max_length=None).pair_ids(
        prompts, responses
    )
    for i in range(len(prompts)):
        ids, labels = prepared[i]["input_ids"], prepared[i]["labels"]
        assert ids == full[i]
        trained = [pos for pos, label in enumerate(labels) if label != -100]
        assert trained == list(range(starts[i], len(ids)))


def test_sft_examples_require_a_response():
    from datasets import Dataset

    with pytest.raises(InputError, match="no response"):
        sft_examples(Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", ""]}), conversational=True)


# -- a whole CPU recipe ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_recipe_runs_end_to_end_and_resumes(tiny_llama_path, tiny_reward_model_path, tmp_path):
    import datasets

    from hf_dataselect.data import load_pool
    from hf_dataselect.demo import demo_pool_path
    from hf_dataselect.evaluation import EvalSet, heldout_loss
    from hf_dataselect.models import load_model, load_tokenizer
    from hf_dataselect.selection import select

    out = tmp_path / "run"
    overrides = [
        "--pool.max_rows", "160",
        "--evaluation.holdout", "32",
        "--selection.budget", "16",
        "--run.output_dir", str(out),
        "--run.methods", "random", "kmq", "iterative-kmq",
        "--training.num_train_epochs", "2",
        "--evaluation.epochs", "1", "2",
        "--model.model_name_or_path", str(tiny_llama_path),
        "--iterative.reward_model", str(tiny_reward_model_path),
        "--iterative.score_rows", "4",
        "--iterative.max_new_tokens", "4",
        "--iterative.k", "4",
        "--run.method_options", "{kmq: {quality_column: rating, k: 4}}",
    ]  # fmt: skip
    r = Recipe.from_yaml(RECIPES / "kmq_cpu.yaml", overrides)
    outcomes = run_recipe(r)
    assert [o.spec.name for o in outcomes] == ["random-16-seed0", "kmq-16-seed0", "iterative-kmq-16-seed0"]

    # one folder holds the resolved recipe, the status, the evaluation rows and every run
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == r.to_dict()
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    heldout_rows = (out / "eval" / "heldout.jsonl").read_text().splitlines()
    assert len(heldout_rows) == 32
    summary = (out / "summary.md").read_text()
    assert all(name in summary for name in ("random-16-seed0", "kmq-16-seed0", "base model"))

    # the saved selection is exactly what select() gives on the same pool (held-out rows removed)
    pool = load_pool(demo_pool_path(), max_rows=160)
    order = np.random.default_rng([0, 7919]).permutation(160)
    kept = pool.select(np.sort(order[32:]))
    heldout_ids = set(pool.select(np.sort(order[:32]))["id"])
    direct = select(kept, "random", 16, seed=0)
    manifest = json.loads((out / "random-16-seed0" / "selection" / "manifest.json").read_text())
    assert [row["row_id"] for row in manifest["selection"]] == direct.row_ids
    assert manifest["budget"] == 16
    kmq_rows = datasets.load_from_disk(str(out / "kmq-16-seed0" / "selection" / "selected"))
    assert len(kmq_rows) == 16 and not heldout_ids & set(kmq_rows["id"])

    # evaluation.json holds per-family losses of the saved model, recomputable from the saved files
    evaluation = json.loads((out / "kmq-16-seed0" / "evaluation.json").read_text())["eval_sets"]["heldout"]
    rows = [json.loads(line) for line in heldout_rows]
    eval_set = EvalSet([x["prompt"] for x in rows], [x["response"] for x in rows], [x["label"] for x in rows])
    model = load_model(str(out / "kmq-16-seed0" / "model"), kind="causal-lm")
    recomputed = heldout_loss(
        model, load_tokenizer(str(out / "kmq-16-seed0" / "model")), eval_set, max_length=256
    )
    assert evaluation["macro_loss"] == pytest.approx(recomputed.macro, rel=1e-5)
    assert set(evaluation["per_label"]) == set(eval_set.labels)
    epochs = [
        json.loads(line)["epoch"]
        for line in (out / "kmq-16-seed0" / "training" / "heldout_loss.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]

    # iterative kMQ selected 16 // 2 = 8 new rows in each of the 2 epochs
    rounds = sorted((out / "iterative-kmq-16-seed0" / "training" / "data_selection").glob("epoch-*.json"))
    assert len(rounds) == 2
    assert outcomes[2].rows == 16

    # a second run resumes: nothing is retrained, the outcomes are the same
    weights = out / "random-16-seed0" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_recipe(Recipe.from_yaml(RECIPES / "kmq_cpu.yaml", overrides))
    assert weights.stat().st_mtime_ns == stamp
    assert [o.summary_row() for o in again] == [o.summary_row() for o in outcomes]

    # the same folder with a different recipe is refused, unless asked to replace it
    with pytest.raises(InputError, match=r"different recipe \(selection.budget: '16' -> '20'\)"):
        run_recipe(Recipe.from_yaml(RECIPES / "kmq_cpu.yaml", [*overrides, "--selection.budget", "20"]))


def test_cli_dry_run_prints_the_resolved_recipe(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "hf_dataselect.cli", "run", str(RECIPES / "kmq_cpu.yaml"), "--dry-run",
         "--selection.budget", "123"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    printed = yaml.safe_load(completed.stdout)
    assert printed["selection"]["budget"] == "123"
    assert "# 4 run(s): random-123-seed0, kmq-random-123-seed0" in completed.stdout


def test_cli_reports_bad_recipes_with_exit_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("selection:\n  methd: kmq\n")
    for args in ([str(bad)], [str(tmp_path / "missing.yaml")], []):
        completed = subprocess.run(
            [sys.executable, "-m", "hf_dataselect.cli", "run", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert completed.returncode == 2
        assert completed.stderr.startswith("error: ")
    completed = subprocess.run(
        [sys.executable, "-m", "hf_dataselect.cli", "run", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "no field 'methd' (did you mean 'method'?)" in completed.stderr
