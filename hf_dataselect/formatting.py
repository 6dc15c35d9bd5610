"""Turn instruction-data rows into a prompt and a response.

Every method needs text, but not always the same text: kMQ embeds prompt + response, ``longest`` measures the
response, iterative kMQ scores the gold response against a generated one for the same prompt. A
:class:`RowFormat` therefore keeps the two parts separately addressable and :meth:`RowFormat.text` joins them.

Auto-detected layouts (first match wins):

=====================  ===========================================================================
``messages``           chat list of ``{"role", "content"}``: prompt = every turn before the last
                       assistant turn, response = that turn
``conversations``      ShareGPT (``{"from", "value"}``) or a plain list of strings (user/assistant
                       alternating, as in LIMA)
``alpaca``             ``instruction`` (+ optional ``input``) / ``output``
``prompt_completion``  ``prompt`` / ``completion`` (strings, or TRL's conversational lists)
``question_answer``    ``question`` / ``answer``
``text``               ``text``: the whole row is the prompt, the response is empty
=====================  ===========================================================================

Users can also name the columns (``prompt_column=``, ``response_column=``) or pass a callable
``formatter(row) -> (prompt, response)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hf_dataselect.errors import InputError

Formatter = Callable[[Mapping[str, Any]], tuple[str, str]]

FORMAT_NAMES = ("messages", "conversations", "alpaca", "prompt_completion", "question_answer", "text")

# ShareGPT speaker names -> chat roles
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}

_FORMAT_HELP = (
    "messages | conversations | instruction/input/output | prompt/completion | question/answer | text; "
    "or name the columns with prompt_column=/response_column= (CLI: --prompt-column/--response-column), "
    "or pass formatter=callable(row) -> (prompt, response)"
)


@dataclass(frozen=True)
class RowFormat:
    """How rows of one dataset become ``(prompt, response)``.

    Build it with :func:`detect_format` (or :meth:`resolve`) rather than by hand; the fields record what was
    detected so that a selection's manifest can say how text was made.
    """

    kind: str
    """One of :data:`FORMAT_NAMES`, ``"columns"`` (user-named columns) or ``"callable"``."""
    prompt_column: str | None = None
    response_column: str | None = None
    input_column: str | None = None
    """Alpaca's optional ``input`` column, appended to the instruction."""
    formatter: Formatter | None = None

    @classmethod
    def resolve(
        cls,
        column_names: Iterable[str],
        *,
        prompt_column: str | None = None,
        response_column: str | None = None,
        formatter: Formatter | None = None,
        row_format: RowFormat | str | None = None,
    ) -> RowFormat:
        """The format to use for a dataset with ``column_names``, honouring whatever the user specified."""
        columns = list(column_names)
        if isinstance(row_format, RowFormat):
            return row_format
        if formatter is not None:
            return cls(kind="callable", formatter=formatter)
        if prompt_column is not None or response_column is not None:
            missing = [c for c in (prompt_column, response_column) if c is not None and c not in columns]
            if missing:
                raise InputError(f"Column(s) {missing} not found; the dataset has columns {columns}.")
            if prompt_column is None:
                raise InputError(
                    "response_column was given without prompt_column; name both (or only the prompt)."
                )
            return cls(kind="columns", prompt_column=prompt_column, response_column=response_column)
        if row_format is not None:
            return _format_by_name(row_format, columns)
        return detect_format(columns)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (for manifests and logs)."""
        if self.kind == "callable":
            name = getattr(self.formatter, "__qualname__", type(self.formatter).__name__)
            return {"kind": "callable", "formatter": name}
        return {
            k: v
            for k, v in {
                "kind": self.kind,
                "prompt_column": self.prompt_column,
                "response_column": self.response_column,
                "input_column": self.input_column,
            }.items()
            if v is not None
        }

    @property
    def has_response(self) -> bool:
        """Whether rows have a response separate from the prompt (``text`` rows do not)."""
        return self.kind != "text"

    # -- conversion -----------------------------------------------------------------------------------
    def prompt_response(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """``(prompt, response)`` of one row; both are strings (the response may be empty)."""
        if self.kind == "callable":
            assert self.formatter is not None
            out = self.formatter(row)
            if not (isinstance(out, tuple | list) and len(out) == 2):
                raise InputError(f"formatter must return (prompt, response), got {type(out).__name__}")
            return _as_text(out[0]), _as_text(out[1])
        if self.kind == "messages":
            return _split_chat(_chat_messages(row[self.prompt_column]))
        if self.kind == "conversations":
            return _split_chat(_sharegpt_messages(row[self.prompt_column]))
        prompt = row[self.prompt_column]
        if self.kind == "prompt_completion" and _is_chat(prompt):
            chat_prompt = _chat_messages(prompt)
            completion = row[self.response_column]
            response_text = (
                _split_chat(_chat_messages(completion))[1] if _is_chat(completion) else _as_text(completion)
            )
            return "\n\n".join(m["content"] for m in chat_prompt if m["content"]), response_text
        prompt_text = _as_text(prompt)
        if self.input_column is not None:
            extra = _as_text(row.get(self.input_column))
            if extra.strip():
                prompt_text = f"{prompt_text}\n\n{extra}"
        response_text = _as_text(row[self.response_column]) if self.response_column else ""
        return prompt_text, response_text

    def batch_prompt_response(self, batch: Mapping[str, Sequence[Any]]) -> tuple[list[str], list[str]]:
        """Column-oriented version of :meth:`prompt_response` for ``datasets.map(batched=True)`` batches."""
        if not batch:
            return [], []
        n = len(next(iter(batch.values())))
        prompts, responses = [], []
        keys = list(batch)
        for i in range(n):
            prompt, response = self.prompt_response({k: batch[k][i] for k in keys})
            prompts.append(prompt)
            responses.append(response)
        return prompts, responses

    def text(self, row: Mapping[str, Any], part: str = "prompt_response") -> str:
        """The text of one row: ``"prompt_response"`` (default), ``"prompt"`` or ``"response"``."""
        return join_parts(*self.prompt_response(row), part=part)

    def batch_text(self, batch: Mapping[str, Sequence[Any]], part: str = "prompt_response") -> list[str]:
        prompts, responses = self.batch_prompt_response(batch)
        return [join_parts(p, r, part=part) for p, r in zip(prompts, responses, strict=True)]


TEXT_PARTS = ("prompt_response", "prompt", "response")


def join_parts(prompt: str, response: str, part: str = "prompt_response") -> str:
    """Join prompt and response the way every transform does (a blank line between them)."""
    if part == "prompt":
        return prompt
    if part == "response":
        return response if response else prompt
    if part != "prompt_response":
        raise InputError(f"Unknown text part {part!r}; expected one of {list(TEXT_PARTS)}.")
    if not response:
        return prompt
    if not prompt:
        return response
    return f"{prompt}\n\n{response}"


def detect_format(column_names: Iterable[str]) -> RowFormat:
    """The first known layout whose columns are all present (see the module docstring for the order)."""
    columns = list(column_names)
    present = set(columns)
    if "messages" in present:
        return RowFormat("messages", prompt_column="messages")
    if "conversations" in present:
        return RowFormat("conversations", prompt_column="conversations")
    if {"instruction", "output"} <= present:
        return RowFormat(
            "alpaca",
            prompt_column="instruction",
            response_column="output",
            input_column="input" if "input" in present else None,
        )
    if {"prompt", "completion"} <= present:
        return RowFormat("prompt_completion", prompt_column="prompt", response_column="completion")
    if {"question", "answer"} <= present:
        return RowFormat("question_answer", prompt_column="question", response_column="answer")
    if "text" in present:
        return RowFormat("text", prompt_column="text")
    raise InputError(f"Cannot tell how to read rows with columns {columns}. Expected one of: {_FORMAT_HELP}.")


def _format_by_name(name: str, columns: list[str]) -> RowFormat:
    if name not in _FORMAT_COLUMNS:
        raise InputError(f"Unknown row format {name!r}; known formats: {list(FORMAT_NAMES)}.")
    required, optional = _FORMAT_COLUMNS[name]
    missing = sorted(required - set(columns))
    if missing:
        raise InputError(f"Row format {name!r} needs column(s) {missing}; the dataset has {columns}.")
    return detect_format([c for c in columns if c in required | optional])


# format name -> (required columns, optional columns)
_FORMAT_COLUMNS: dict[str, tuple[set[str], set[str]]] = {
    "messages": ({"messages"}, set()),
    "conversations": ({"conversations"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "prompt_completion": ({"prompt", "completion"}, set()),
    "question_answer": ({"question", "answer"}, set()),
    "text": ({"text"}, set()),
}


# -- helpers ---------------------------------------------------------------------------------------------
def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):  # e.g. multimodal content parts or a list of strings
        return "\n".join(_as_text(v.get("text") if isinstance(v, Mapping) else v) for v in value)
    return str(value)


def _is_chat(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and isinstance(value[0], Mapping)


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise InputError(f"Expected a list of chat messages, got {type(value).__name__}.")
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or "content" not in message:
            raise InputError(f"Chat messages need 'role' and 'content' keys; got {message!r:.120}.")
        messages.append({"role": str(message.get("role", "user")), "content": _as_text(message["content"])})
    return messages


def _sharegpt_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise InputError(f"Expected a list of conversation turns, got {type(value).__name__}.")
    if all(isinstance(turn, str) for turn in value):  # LIMA-style: user/assistant alternating
        return [
            {"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(value)
        ]
    messages = []
    for turn in value:
        if isinstance(turn, Mapping) and "value" in turn:
            speaker = str(turn.get("from", "human")).lower()
            messages.append(
                {"role": _SHAREGPT_ROLES.get(speaker, "user"), "content": _as_text(turn["value"])}
            )
        elif isinstance(turn, Mapping) and "content" in turn:
            messages.append({"role": str(turn.get("role", "user")), "content": _as_text(turn["content"])})
        else:
            raise InputError(f"ShareGPT turns need 'from' and 'value' keys; got {turn!r:.120}.")
    return messages


def _split_chat(messages: list[dict[str, str]]) -> tuple[str, str]:
    """Prompt = every turn before the last assistant turn; response = that turn."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        return "\n\n".join(m["content"] for m in messages if m["content"]), ""
    prompt = "\n\n".join(m["content"] for m in messages[:last_assistant] if m["content"])
    return prompt, messages[last_assistant]["content"]


def check_texts(prompts: Sequence[str], responses: Sequence[str], *, need_response: bool = False) -> None:
    """Raise :class:`InputError` naming the first bad rows when a text (or a needed response) is empty."""
    empty = [
        i for i, (p, r) in enumerate(zip(prompts, responses, strict=True)) if not (p.strip() or r.strip())
    ]
    if empty:
        raise InputError(
            f"{len(empty)} row(s) have no text (empty or missing prompt and response), e.g. row position(s) "
            f"{empty[:5]}. Drop them first (dataset.filter) or fix the formatting columns."
        )
    if need_response:
        no_response = [i for i, r in enumerate(responses) if not r.strip()]
        if no_response:
            raise InputError(
                f"{len(no_response)} row(s) have no response, e.g. row position(s) {no_response[:5]}; "
                "this method needs a prompt and a gold response in every row."
            )
