"""Reading the fields of a decoded row, and naming what is wrong with them."""

from __future__ import annotations

from typing import Any

Problem = tuple[str, str, str]  # (field path, kind, message)
Warning = tuple[str, str]  # (kind, message)
Normalized = tuple[dict[str, Any] | None, list[Problem], list[Warning]]

MISSING = object()


def chat_turn(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


def string(obj: dict, key: str, problems: list[Problem], *, required: bool = False,
            non_empty: bool = False, path: str | None = None) -> str:
    """Read a string field, recording why not. An optional field may be absent or null."""
    value = obj.get(key, MISSING)
    if type(value) is str:
        if non_empty and not value.strip():
            problems.append((path or key, "empty_value", "must not be empty"))
        return value
    if value is MISSING or (value is None and not required):
        if required:
            problems.append((path or key, "missing_field", "missing required field"))
        return ""
    problems.append((path or key, "wrong_type", f"expected a string, got {type_name(value)}"))
    return ""


_TYPE_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
               list: "array", dict: "object"}


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def short(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_names(row: dict) -> str:
    if not row:
        return "no fields"
    names = ", ".join(short(k, 30) for k in list(row)[:6])
    return f"fields {names}" + (", ..." if len(row) > 6 else "")


def turn_list(row: dict, key: str, problems: list[Problem]) -> list:
    turns = row.get(key, MISSING)
    if turns is MISSING:
        problems.append((key, "missing_field", "missing required field"))
    elif type(turns) is not list:
        problems.append((key, "wrong_type", f"expected an array, got {type_name(turns)}"))
    elif not turns:
        problems.append((key, "empty_value", "must not be empty"))
    else:
        return turns
    return []
