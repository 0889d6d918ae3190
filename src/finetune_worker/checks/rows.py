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


def row_shape(entry: dict, list_key: str, rl: str | None = None) -> RowShape | PreferenceShape | None:
    """What rows need for this dataset entry's `type`; None when the worker does not know."""
    kind = entry.get("type")
    if rl and list_key != "pretraining_dataset":
        return preference_shape(entry, str(rl)) if str(rl) in PREFERENCE_RL else None
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


def row_problem(row: Any, shape: RowShape | PreferenceShape | None) -> tuple[str | None, bool]:
    """(what is wrong with the row or None, whether it is empty)."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not an object", False
    if shape is None:
        return None, False
    if isinstance(shape, PreferenceShape):
        return shape.problem(row), False
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




# -- preference datasets (rl: dpo, ipo, orpo, kto, simpo) --------------------------
#
# The fields are those the transform of Axolotl 0.21's strategy reads
# (axolotl/prompt_strategies/{dpo,kto,orpo}/), for `type` loaded as
# axolotl/utils/data/rl.py loads it; after the transform, rl.py's length filter needs
# prompt, chosen and rejected (KTO: prompt and completion) as strings, and TRL's KTO
# trainer a boolean `label`.

PREFERENCE_RL = ("dpo", "ipo", "orpo", "kto", "simpo")
TEXT, VALUE, LABEL, TURNS, PROMPT_MESSAGES, REPLY = "text", "value", "label", "turns", "prompt_messages", "reply"


@dataclass(frozen=True)
class Need:
    """One field a preference row needs: `names` are alternatives the transform tries in order."""

    names: tuple[str, ...]
    kind: str = TEXT  # text: a string; value: any value; label: true/false; turns: a list of messages;
    # prompt_messages: a string or a list of messages; reply: a string, a message or a list of messages
    min_turns: int = 1
    even_turns: bool = False
    not_empty: bool = False  # rl.py's length filter stops the run on an empty prompt/chosen/rejected/completion

    def describe(self) -> str:
        return self.names[0] + "".join(f" (or {name})" for name in self.names[1:])


@dataclass(frozen=True)
class PreferenceShape:
    """The fields a row of one preference dataset type must have."""

    needs: tuple[Need, ...]
    role_key: str = "role"
    content_key: str = "content"
    roles: tuple[str, ...] | None = None  # the roles the type maps (chat_template types), None: any

    def describe(self) -> str:
        return ", ".join(need.describe() for need in self.needs)

    def problem(self, row: dict) -> str | None:
        wanted = f" (this dataset type needs {self.describe()})"
        for need in self.needs:
            name = next((n for n in need.names if row.get(n) is not None), None)
            if name is None:
                others = "".join(f" (or '{n}')" for n in need.names[1:])
                return f"missing field '{need.names[0]}'{others}{wanted}"
            problem = self._value_problem(need, name, row[name])
            if problem:
                return problem
        return None

    def _value_problem(self, need: Need, name: str, value: Any) -> str | None:
        kind = need.kind
        if kind == TEXT and not isinstance(value, str):
            return f"field '{name}' must be a string, not {type(value).__name__}"
        if need.not_empty and not value:
            return f"field '{name}' is empty (Axolotl stops the run on a row without {name})"
        if kind == LABEL and not isinstance(value, bool):
            return f"field '{name}' must be true or false (is the completion desirable), not {json_kind(value)}"
        if kind == PROMPT_MESSAGES and isinstance(value, str):
            return None
        if kind == REPLY:
            if isinstance(value, str):
                return None
            if isinstance(value, dict):
                return self._turn_problem(name, value)
            if isinstance(value, list) and value:
                return self._turn_problem(f"{name}[{len(value) - 1}]", value[-1])
            return f"field '{name}' must be a string, a message or a list of messages, not {json_kind(value)}"
        if kind in (TURNS, PROMPT_MESSAGES):
            if not isinstance(value, list):
                return f"field '{name}' must be a list of messages, not {type(value).__name__}"
            if len(value) < need.min_turns:
                return f"field '{name}' has {len(value)} messages; this dataset type needs at least {need.min_turns}"
            if need.even_turns and len(value) % 2:
                return f"field '{name}' has {len(value)} messages; this dataset type needs user/assistant pairs (an even number)"
            for index, turn in enumerate(value):
                problem = self._turn_problem(f"{name}[{index}]", turn)
                if problem:
                    return problem
        return None

    def _turn_problem(self, where: str, turn: Any) -> str | None:
        keys = (self.role_key, self.content_key) if self.roles is not None else (self.content_key,)
        if not isinstance(turn, dict):
            return f"{where} must be an object with " + " and ".join(f"'{k}'" for k in keys)
        for key in keys:
            if key not in turn:
                return f"{where} is missing '{key}'"
        if self.roles is not None and turn[self.role_key] not in self.roles:
            return f"{where} has role {turn[self.role_key]!r}, not one of {', '.join(self.roles)} (map others with `roles`)"
        return None


def json_kind(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__
    )


PROMPT = Need(("prompt",))
CHOSEN, REJECTED, COMPLETION = Need(("chosen",)), Need(("rejected",)), Need(("completion",))
LABEL_NEED = Need(("label",), LABEL)

# chatml.* and llama3.* (the same fields, another template)
TEMPLATE_TYPES_DPO = {
    "default": (Need(("prompt", "input", "question", "instruction")), Need(("chosen", "chosen_response")), Need(("rejected", "rejected_response"))),
    "argilla_chat": (Need(("chosen",), TURNS, min_turns=2), Need(("rejected",), TURNS, min_turns=2)),
    "icr": (Need(("input",)), CHOSEN, REJECTED),
    "intel": (Need(("question",)), CHOSEN, REJECTED),
    "prompt_pairs": (PROMPT, CHOSEN, REJECTED),
    "ultra": (PROMPT, Need(("chosen",), TURNS, min_turns=2), Need(("rejected",), TURNS, min_turns=2)),
}
TEMPLATE_TYPES_KTO = {
    "argilla": (Need(("instruction",)), COMPLETION, LABEL_NEED),
    "argilla_chat": (Need(("completion",), TURNS), LABEL_NEED),
    "intel": (Need(("question",)), COMPLETION, LABEL_NEED),
    "prompt_pairs": (PROMPT, COMPLETION, LABEL_NEED),
    "ultra": (PROMPT, COMPLETION, LABEL_NEED),
}
# rows already in the trainer's shape (no type, or dpo's passthrough): rl.py's filter reads them as they are
READY_DPO = tuple(Need((name,), not_empty=True) for name in ("prompt", "chosen", "rejected"))
READY_KTO = (Need(("prompt",), not_empty=True), Need(("completion",), not_empty=True), LABEL_NEED)
CHAT_ROLES = ("user", "assistant", "system", "tool")


def preference_shape(entry: dict, rl: str) -> PreferenceShape | None:
    """What a row of a preference dataset needs for `rl`; None when the worker does not know."""
    kind, kto = entry.get("type"), rl == "kto"
    if kind is None:
        return PreferenceShape(READY_KTO if kto else READY_DPO)
    if isinstance(kind, dict):  # user_defined.default: the type's own field names
        if kto:
            names = (("field_prompt", "prompt"), ("field_completion", "completion"))
            return PreferenceShape((*(Need((kind.get(k) or d,), VALUE) for k, d in names), Need((kind.get("field_label") or "label",), LABEL)))
        names = (("field_prompt", "prompt"), ("field_chosen", "chosen"), ("field_rejected", "rejected"))
        return PreferenceShape(tuple(Need((kind.get(k) or d,), VALUE) for k, d in names))
    if not isinstance(kind, str):
        return None
    module, _, function = kind.partition(".")
    function = function or "default"
    if rl == "orpo":
        if (module, function) == ("chat_template", "argilla"):
            return PreferenceShape((Need(("chosen",), TURNS, min_turns=2, even_turns=True), Need(("rejected",), TURNS, min_turns=2)))
        return None
    if module in ("chatml", "llama3"):
        needs = (TEMPLATE_TYPES_KTO if kto else TEMPLATE_TYPES_DPO).get(function)
        return PreferenceShape(needs) if needs else None
    if kto:
        return None
    if module == "passthrough":
        return PreferenceShape(READY_DPO)
    if module == "zephyr" and function == "nectar":
        return PreferenceShape((PROMPT, Need(("answers",), VALUE)))
    if module == "chat_template":
        mappings = {"role": "role", "content": "content", **(entry.get("message_property_mappings") or {})}
        role_key = entry.get("message_field_role") or mappings["role"]
        content_key = entry.get("message_field_content") or mappings["content"]
        roles = tuple(source for sources in (entry.get("roles") or {t: [t] for t in CHAT_ROLES}).values() for source in sources)
        chosen, rejected = entry.get("field_chosen") or "chosen", entry.get("field_rejected") or "rejected"
        if function == "default":
            needs = (Need((entry.get("field_messages") or "messages",), PROMPT_MESSAGES), Need((chosen,), REPLY), Need((rejected,), REPLY))
        elif function == "argilla_chat":
            needs = (Need((chosen,), TURNS, min_turns=2), Need((rejected,), TURNS))
        else:
            return None
        return PreferenceShape(needs, role_key=role_key, content_key=content_key, roles=roles)
    return None
