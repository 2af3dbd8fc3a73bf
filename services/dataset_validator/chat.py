"""The chat formats: ShareGPT (LLaMA-Factory's `conversations`) and OpenAI's `messages`, both
to canonical {"messages": [...]} rows, with the full check and the fast paths."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

from .fields import (
    MISSING,
    Normalized,
    Problem,
    Warning,
    chat_turn,
    short,
    string,
    turn_list,
    type_name,
)

FastPath = Callable[[bytes], tuple[bytes, int] | None]

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}
OPENAI_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "tool", "function": "tool",
}


def sharegpt(row: dict) -> Normalized:
    problems: list[Problem] = []
    turns = turn_list(row, "conversations", problems)
    system = string(row, "system", problems)
    tools = _tools(row, problems)
    messages = [chat_turn("system", system)] if system else []
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        if type(turn) is not dict:
            problems.append((path, "wrong_type", f"expected an object, got {type_name(turn)}"))
            continue
        role_key, content_key = ("from", "value") if "from" in turn or "value" in turn \
            else ("role", "content")
        tag = string(turn, role_key, problems, required=True, path=f"{path}.{role_key}")
        content = string(turn, content_key, problems, required=True,
                          path=f"{path}.{content_key}")
        role = SHAREGPT_ROLES.get(tag)
        if role is None and type(turn.get(role_key)) is str:
            problems.append((f"{path}.{role_key}", "invalid_value",
                             f"expected one of {', '.join(SHAREGPT_ROLES)}, got {short(tag)}"))
        messages.append(chat_turn(role or "", content))
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        out["tools"] = tools
    return out, problems, _chat_warnings(messages, "conversations", 1 if system else 0)


def messages(row: dict) -> Normalized:
    problems: list[Problem] = []
    turns = turn_list(row, "messages", problems)
    tools = _tools(row, problems)
    messages = []
    for i, turn in enumerate(turns):
        path = f"messages[{i}]"
        if type(turn) is not dict:
            problems.append((path, "wrong_type", f"expected an object, got {type_name(turn)}"))
            continue
        if "role" not in turn and "from" in turn:
            problems.append((f"{path}.role", "missing_field",
                             "missing required field (a turn with 'from'/'value' is ShareGPT: "
                             "put the turns under 'conversations')"))
            continue
        tag = string(turn, "role", problems, required=True, path=f"{path}.role")
        role = OPENAI_ROLES.get(tag)
        if role is None and type(turn.get("role")) is str:
            problems.append((f"{path}.role", "invalid_value",
                             f"expected one of system, user, assistant, tool, got {short(tag)}"))
        message = chat_turn(role or "", _content(turn, path, role, problems))
        if role == "assistant" and (calls := turn.get("tool_calls")) is not None:
            if type(calls) is list:
                message["tool_calls"] = calls
            else:
                problems.append((f"{path}.tool_calls", "wrong_type",
                                 f"expected an array, got {type_name(calls)}"))
        if role == "tool" and type(call_id := turn.get("tool_call_id")) is str:
            message["tool_call_id"] = call_id
        messages.append(message)
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        out["tools"] = tools
    return out, problems, _chat_warnings(messages, "messages", 0)


def _content(turn: dict, path: str, role: str | None, problems: list[Problem]) -> str:
    """OpenAI content: a string, text parts (joined), or null beside an assistant's tool calls."""
    content = turn.get("content", MISSING)
    if type(content) is str:
        return content
    if (content is None or content is MISSING) and role == "assistant" and turn.get("tool_calls"):
        return ""
    if type(content) is list:
        texts = []
        for j, part in enumerate(content):
            if type(part) is dict and part.get("type") == "text" and type(part.get("text")) is str:
                texts.append(part["text"])
            else:
                problems.append((f"{path}.content[{j}]", "invalid_value",
                                 "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                 "can be trained on"))
        return "".join(texts)
    if content is MISSING:
        problems.append((f"{path}.content", "missing_field", "missing required field"))
    else:
        problems.append((f"{path}.content", "wrong_type",
                         f"expected a string, got {type_name(content)}"))
    return ""


def _tools(row: dict, problems: list[Problem]) -> list | None:
    """Tool definitions: a JSON array, or (LLaMA-Factory's way) a string holding one."""
    tools = row.get("tools")
    if tools is None or type(tools) is list:
        return tools
    if type(tools) is str:
        try:
            parsed = json.loads(tools) if tools.strip() else []
        except ValueError:
            parsed = None
        if type(parsed) is list:
            return parsed or None
    problems.append(("tools", "wrong_type",
                     f"expected an array of tool definitions (or a string holding one), "
                     f"got {type_name(tools)}"))
    return None


def _chat_warnings(messages: list[dict], key: str, offset: int) -> list[Warning]:
    """Turns should run [system], user, assistant, user, assistant, ... (tool results answer on
    the user's side). Neither a break in that nor a missing answer stops training, so both
    are warnings. `offset` maps an index in `messages` back to the row's own list."""
    warnings: list[Warning] = []
    previous = "system"
    for i, message in enumerate(messages):
        role = message["role"]
        side = "assistant" if role == "assistant" else "system" if role == "system" else "user"
        if side == "system" and previous != "system":
            broken = "a system turn after the conversation started"
        elif side == "assistant" and previous != "user":
            broken = "an assistant turn that answers no user turn"
        elif side == previous == "user" and not role == "tool" == messages[i - 1]["role"]:
            broken = "two user turns in a row"
        else:
            broken = None
        if broken:
            warnings.append(("role_alternation", f"{key}[{i - offset}]: roles do not alternate "
                             f"user/assistant ({broken})"))
            break
        previous = side
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        warnings.append(("no_assistant", "no assistant turn"))
    elif any(not m["content"].strip() and not m.get("tool_calls") for m in answers):
        warnings.append(("empty_output", "empty assistant output"))
    return warnings


class Turn(msgspec.Struct, omit_defaults=True, gc=False):
    """A plain OpenAI turn; encoding it gives exactly the canonical {"role", "content"}."""

    role: str
    content: str
    tool_calls: None = None  # any value other than null: the full check handles the row


MESSAGES_FIELDS = [("messages", list[Turn]), ("tools", None, None)]


def messages_fast(decode: Callable[[bytes], Any]) -> FastPath:
    """`decode` reads MESSAGES_FIELDS."""
    encode = msgspec.json.encode

    def fast(line: bytes) -> tuple[bytes, int] | None:
        try:
            turns = decode(line).messages
        except Exception:
            return None
        if not _plain_dialogue([t.role for t in turns], [t.content for t in turns]):
            return None
        return b'{"messages":%b}\n' % encode(turns), sum(len(t.content) for t in turns)

    return fast


class ShareTurn(msgspec.Struct, gc=False):
    tag: str = msgspec.field(name="from")
    value: str


_SHARE_PLAIN = {"human": "user", "gpt": "assistant", "system": "system"}


SHAREGPT_FIELDS = [
    ("conversations", list[ShareTurn]), ("system", str | None, None), ("tools", None, None),
]


def sharegpt_fast(decode: Callable[[bytes], Any]) -> FastPath:
    """`decode` reads SHAREGPT_FIELDS."""
    encode = msgspec.json.encode
    opening = {role: b'{"role":"%s","content":' % role.encode() for role in _SHARE_PLAIN.values()}

    def fast(line: bytes) -> tuple[bytes, int] | None:
        try:
            row = decode(line)
        except Exception:
            return None
        roles = [_SHARE_PLAIN.get(t.tag) for t in row.conversations]
        contents = [t.value for t in row.conversations]
        if row.system:
            roles.insert(0, "system")
            contents.insert(0, row.system)
        if not _plain_dialogue(roles, contents):
            return None
        turns = b",".join(opening[r] + encode(c) + b"}" for r, c in zip(roles, contents))
        return b'{"messages":[%b]}\n' % turns, sum(map(len, contents))

    return fast


def _plain_dialogue(roles: list, contents: list[str]) -> bool:
    """[system], then user and assistant turns strictly alternating, ending with a non-empty
    answer: a row on which the full check finds nothing to say."""
    start = 1 if roles and roles[0] == "system" else 0
    n = len(roles) - start
    if n < 2 or n % 2:
        return False
    if roles[start::2] != ["user"] * (n // 2) or roles[start + 1::2] != ["assistant"] * (n // 2):
        return False
    return all(c and not c.isspace() for c in contents[start + 1::2])
