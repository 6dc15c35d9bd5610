import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from hf_dataselect.data import load_pool, matrix_column, numeric_column, pool_prompt_response
from hf_dataselect.errors import InputError
from hf_dataselect.formatting import detect_format

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}", "score": float(i)} for i in range(6)]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_load_pool_files(tmp_path, suffix):
    path = tmp_path / f"pool{suffix}"
    dataset = Dataset.from_list(ROWS)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        dataset.to_csv(str(path), index=False)
    else:
        dataset.to_parquet(str(path))
    loaded = load_pool(path)
    assert loaded["prompt"] == [r["prompt"] for r in ROWS]
    assert len(load_pool(path, max_rows=2)) == 2


def test_load_pool_saved_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert len(load_pool(tmp_path / "single")) == 6
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert len(load_pool(tmp_path / "dict")) == 6
    assert len(load_pool(tmp_path / "dict", split="test")) == 2
    with pytest.raises(InputError, match=r"splits \['train', 'test'\]"):
        load_pool(tmp_path / "dict", split="validation")


def test_load_pool_errors(tmp_path):
    with pytest.raises(InputError, match="No such file"):
        load_pool(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="No such file"):
        load_pool("./data/pool.jsonl")
    (tmp_path / "pool.xlsx").write_text("x")
    with pytest.raises(InputError, match=r"Unknown file type '\.xlsx'"):
        load_pool(tmp_path / "pool.xlsx")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"\n{{{\n')
    with pytest.raises(InputError, match="Could not read"):
        load_pool(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError):
        load_pool(tmp_path / "empty.jsonl")


def test_matrix_column_reads_through_index_mappings():
    vectors = np.arange(12, dtype=np.float32).reshape(6, 2)
    dataset = Dataset.from_dict({"embedding": vectors.tolist()}).select([4, 1, 2])
    np.testing.assert_array_equal(matrix_column(dataset, "embedding"), vectors[[4, 1, 2]])


def test_matrix_column_errors():
    with pytest.raises(InputError, match="different lengths"):
        matrix_column(Dataset.from_dict({"e": [[1.0, 2.0], [1.0]]}), "e")
    with pytest.raises(InputError, match="NaN"):
        matrix_column(Dataset.from_dict({"e": [[1.0, float("nan")], [1.0, 2.0]]}), "e")
    with pytest.raises(InputError, match="not a list of numbers"):
        matrix_column(Dataset.from_dict({"e": ["a", "b"]}), "e")
    with pytest.raises(InputError, match=r"needs column\(s\) \['e'\]"):
        matrix_column(Dataset.from_dict({"x": [1]}), "e")


def test_numeric_column_errors():
    assert numeric_column(Dataset.from_dict({"q": [1, 2]}), "q", purpose="t").tolist() == [1.0, 2.0]
    with pytest.raises(InputError, match="must be numeric"):
        numeric_column(Dataset.from_dict({"q": ["high", "low"]}), "q", purpose="t")
    with pytest.raises(InputError, match="missing value"):
        numeric_column(Dataset.from_dict({"q": [1.0, None]}), "q", purpose="t")
    with pytest.raises(InputError, match="NaN"):
        numeric_column(Dataset.from_dict({"q": [1.0, float("nan")]}), "q", purpose="t")


def test_pool_prompt_response():
    dataset = Dataset.from_list(ROWS)
    prompts, responses = pool_prompt_response(dataset, detect_format(dataset.column_names), batch_size=4)
    assert prompts == [r["prompt"] for r in ROWS]
    assert responses == [r["completion"] for r in ROWS]
