import pytest

from hf_dataselect.errors import InputError
from hf_dataselect.formatting import RowFormat, check_texts, detect_format, join_parts


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            },
            ("Be brief.\n\nHi\n\nHello!\n\nCapital of France?", "Paris."),
        ),
        ({"conversations": ["What is 2+2?", "4"]}, ("What is 2+2?", "4")),  # LIMA: plain strings
        (
            {
                "conversations": [
                    {"from": "human", "value": "Name a colour."},
                    {"from": "gpt", "value": "Blue."},
                ]
            },
            ("Name a colour.", "Blue."),
        ),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, ("Add.\n\n2 and 3", "5")),
        ({"instruction": "Say hi.", "input": "", "output": "Hi"}, ("Say hi.", "Hi")),
        ({"prompt": "Q?", "completion": "A."}, ("Q?", "A.")),
        (
            {
                "prompt": [{"role": "user", "content": "Q?"}],
                "completion": [{"role": "assistant", "content": "A."}],
            },
            ("Q?", "A."),
        ),
        ({"question": "Why?", "answer": "Because."}, ("Why?", "Because.")),
        ({"text": "Just text."}, ("Just text.", "")),
    ],
)
def test_auto_detected_formats(row, expected):
    row_format = detect_format(row.keys())
    assert row_format.prompt_response(row) == expected


def test_detection_order_and_kinds():
    assert detect_format(["messages", "text"]).kind == "messages"
    assert detect_format(["instruction", "output", "text"]).kind == "alpaca"
    assert detect_format(["instruction", "output"]).input_column is None
    assert detect_format(["prompt", "completion"]).kind == "prompt_completion"
    assert detect_format(["text", "label"]).has_response is False


def test_unknown_columns_error_names_the_columns():
    with pytest.raises(InputError) as err:
        detect_format(["foo", "bar"])
    assert "['foo', 'bar']" in str(err.value)
    assert "prompt_column" in str(err.value)


def test_user_columns_and_callable():
    row = {"q": "Why?", "a": "Because.", "extra": 1}
    by_columns = RowFormat.resolve(row.keys(), prompt_column="q", response_column="a")
    assert by_columns.prompt_response(row) == ("Why?", "Because.")
    by_callable = RowFormat.resolve(row.keys(), formatter=lambda r: (r["a"], r["q"]))
    assert by_callable.prompt_response(row) == ("Because.", "Why?")
    with pytest.raises(InputError, match="not found"):
        RowFormat.resolve(row.keys(), prompt_column="missing")


def test_format_by_name():
    assert RowFormat.resolve(["prompt", "completion", "text"], row_format="text").kind == "text"
    with pytest.raises(InputError, match="Unknown row format"):
        RowFormat.resolve(["text"], row_format="chatml")
    with pytest.raises(InputError, match=r"needs column\(s\) \[.instruction., .output.\]"):
        RowFormat.resolve(["text"], row_format="alpaca")


def test_batch_and_text_parts():
    batch = {"prompt": ["a", "b"], "completion": ["x", ""]}
    row_format = detect_format(batch.keys())
    assert row_format.batch_text(batch) == ["a\n\nx", "b"]
    assert row_format.batch_text(batch, part="prompt") == ["a", "b"]
    assert row_format.batch_text(batch, part="response") == ["x", "b"]  # no response: fall back to the prompt
    assert join_parts("", "r") == "r"
    with pytest.raises(InputError, match="Unknown text part"):
        join_parts("p", "r", part="both")


def test_check_texts_reports_positions():
    check_texts(["a", "b"], ["", "y"])
    with pytest.raises(InputError, match=r"1 row\(s\) have no text.*\[1\]"):
        check_texts(["a", " "], ["x", ""])
    with pytest.raises(InputError, match=r"no response.*\[0\]"):
        check_texts(["a", "b"], ["", "y"], need_response=True)


def test_malformed_chat_rows_raise():
    with pytest.raises(InputError, match="role"):
        detect_format(["messages"]).prompt_response({"messages": [{"speaker": "x"}]})
    with pytest.raises(InputError, match="from"):
        detect_format(["conversations"]).prompt_response({"conversations": [{"who": "x"}]})
