"""The fields each dataset type needs in a row, and what is wrong with a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# -- what each dataset type needs -------------------------------------------------


@dataclass(frozen=True)
class RowShape:
    """The fields a row of one dataset type must have."""

    text_fields: tuple[str, ...] = ()  # strings; the row is empty when all are blank
    messages_field: str | None = None  # a list of {role, content} objects
    role_key: str = "role"
    content_key: str = "content"
    list_fields: tuple[str, ...] = ()

    def describe(self) -> str:
        names = [*self.text_fields, *self.list_fields, *([self.messages_field] if self.messages_field else [])]
        return " and ".join(names)


ALPACA_TYPES = ("alpaca", "alpaca_chat", "alpaca_w_system")


def row_shape(entry: dict, list_key: str) -> RowShape | None:
    """What rows need for this dataset entry's `type`; None when the worker does not know."""
    kind = entry.get("type")
    if list_key == "pretraining_dataset" or kind == "pretrain":
        return RowShape(text_fields=(entry.get("text_column") or "text",))
    if isinstance(kind, dict):
        return RowShape(text_fields=(kind.get("field_instruction") or "instruction", kind.get("field_output") or "output"))
    if not isinstance(kind, str):
        return None
    base = kind.split(":")[0].split(".")[0]
    if base in ALPACA_TYPES:
        return RowShape(text_fields=("instruction", "output"))
    if base == "completion":
        return RowShape(text_fields=(entry.get("field") or "text",))
    if base == "input_output":
        return RowShape(list_fields=("segments",))
    if base == "chat_template":
        mappings = entry.get("message_property_mappings") or {}
        return RowShape(
            messages_field=entry.get("field_messages") or "messages",
            role_key=mappings.get("role") or entry.get("message_field_role") or "role",
            content_key=mappings.get("content") or entry.get("message_field_content") or "content",
        )
    return None


EVAL_FORMAT_SHAPES = {
    "alpaca": RowShape(text_fields=("instruction", "output")),
    "messages": RowShape(messages_field="messages"),
    "prompt_completion": RowShape(text_fields=("prompt", "completion")),
}


def eval_row_shape(fmt: str) -> RowShape | None:
    return EVAL_FORMAT_SHAPES.get(fmt)


def row_problem(row: Any, shape: RowShape | None) -> tuple[str | None, bool]:
    """(what is wrong with the row or None, whether it is empty)."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not an object", False
    if shape is None:
        return None, False
    wanted = f" (this dataset type needs {shape.describe()})"
    for name in shape.text_fields:
        if row.get(name) is None:
            return f"missing field '{name}'{wanted}", False
        if not isinstance(row[name], str):
            return f"field '{name}' must be a string, not {type(row[name]).__name__}", False
    for name in shape.list_fields:
        if not isinstance(row.get(name), list):
            return f"missing field '{name}' (a list){wanted}", False
    if shape.messages_field:
        problem = _messages_problem(row.get(shape.messages_field), shape)
        if problem:
            return problem, False
        return None, not row[shape.messages_field]
    empty = bool(shape.text_fields) and not row[shape.text_fields[-1]].strip()  # the answer (or the text)
    return None, empty


def _messages_problem(messages: Any, shape: RowShape) -> str | None:
    name = shape.messages_field
    if messages is None:
        return f"missing field '{name}' (a list of {{'{shape.role_key}': ..., '{shape.content_key}': ...}} objects)"
    if not isinstance(messages, list):
        return f"field '{name}' must be a list of messages, not {type(messages).__name__}"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{index}] must be an object with '{shape.role_key}' and '{shape.content_key}'"
        for key in (shape.role_key, shape.content_key):
            if key not in message:
                return f"{name}[{index}] is missing '{key}'"
    return None


