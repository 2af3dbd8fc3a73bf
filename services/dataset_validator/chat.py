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
    """LLaMA-Factory's ShareGPT rows. Its converter's rule for role order holds: after an
    optional system turn, human/observation turns at odd positions (1st, 3rd, ...) and
    gpt/function_call turns at even ones, ending on a gpt/function_call turn; a function_call
    turn holds JSON ({"name", "arguments"} or a list of them), which becomes `tool_calls`."""
    problems: list[Problem] = []
    turns = turn_list(row, "conversations", problems)
    system = string(row, "system", problems)
    tools = tools_of(row, problems)
    messages = [chat_turn("system", system)] if system else []
    position = 0  # in the dialogue, after a leading system turn
    ordered_badly = False
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        if type(turn) is not dict:
            problems.append((path, "wrong_type", f"expected an object, got {type_name(turn)}"))
            position += 1
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
        if role == "system" and i == 0 and not system:
            messages.append(chat_turn("system", content))
            continue
        if role is not None and _SIDE.get(role) != position % 2 and not ordered_badly:
            ordered_badly = True  # the first break says it; what follows it is off by one
            problems.append((f"{path}.{role_key}", "role_order",
                             f"{short(tag)} at turn {position + 1} of the dialogue: "
                             f"{_ORDER_RULE}"))
        message = chat_turn(role or "", content)
        if tag == "function_call":
            calls = _function_call(content, f"{path}.{content_key}", problems)
            message = {"role": "assistant", "content": "", "tool_calls": calls}
        _weight(turn, path, role, message, problems)
        messages.append(message)
        position += 1
    if turns and not problems and position % 2:
        problems.append((f"conversations[{len(turns) - 1}]", "role_order",
                         f"the dialogue ends on a human/observation turn: {_ORDER_RULE}"))
    elif turns and not problems:
        _something_to_train(messages, "conversations", problems)
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        out["tools"] = tools
    return out, problems, _empty_answer(messages)


# LLaMA-Factory's converter (SharegptDatasetConverter): odd positions human/observation, even
# positions gpt/function_call; a dialogue that breaks this is skipped there, an error here.
_SIDE = {"user": 0, "tool": 0, "assistant": 1}
_ORDER_RULE = ("ShareGPT turns run human/observation, gpt/function_call, ... and end on a "
               "gpt/function_call turn (LLaMA-Factory's rule)")


def messages(row: dict) -> Normalized:
    """OpenAI chat rows. At least one assistant turn (as OpenAI and Together require); the
    order of turns is not enforced (a break in user/assistant alternation is a warning)."""
    problems: list[Problem] = []
    turns = turn_list(row, "messages", problems)
    tools = tools_of(row, problems)
    messages = openai_turns(turns, "messages", problems)
    if messages and not problems:
        _something_to_train(messages, "messages", problems)
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        out["tools"] = tools
    return out, problems, _chat_warnings(messages, "messages")


def openai_turns(turns: list, key: str, problems: list[Problem]) -> list[dict]:
    """OpenAI turns ({role, content, ...}) at `key` as canonical turns; what is wrong with them
    goes to `problems` under `key[i]...`."""
    messages = []
    for i, turn in enumerate(turns):
        path = f"{key}[{i}]"
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
                message["tool_calls"] = _tool_calls(calls, f"{path}.tool_calls", problems)
            else:
                problems.append((f"{path}.tool_calls", "wrong_type",
                                 f"expected an array, got {type_name(calls)}"))
        if role == "tool" and type(call_id := turn.get("tool_call_id")) is str:
            message["tool_call_id"] = call_id
        _weight(turn, path, role, message, problems)
        messages.append(message)
    return messages


def _something_to_train(messages: list[dict], key: str, problems: list[Problem]) -> None:
    """At least one assistant turn (OpenAI's and Together's rule), and not every one of them
    weighted 0: either way there would be nothing to train on."""
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        problems.append((key, "no_assistant", "needs at least one assistant turn: there is "
                         "nothing to train on (OpenAI's and Together's rule)"))
    elif all(m.get("weight") == 0 for m in answers):
        problems.append((key, "no_trained_turn", "every assistant turn has weight 0: there is "
                         "nothing to train on"))


def _weight(turn: dict, path: str, role: str | None, message: dict,
            problems: list[Problem]) -> None:
    """OpenAI's and Together's per-message `weight`: 0 (no loss on this turn) or 1, on assistant
    turns only; kept in the canonical turn, so that the trainers honour it."""
    weight = turn.get("weight")
    if weight is None:
        return
    if type(weight) is not int or weight not in (0, 1):
        problems.append((f"{path}.weight", "invalid_value",
                         f"expected the integer 0 or 1, got {short(json.dumps(weight))}"))
    elif role is not None and role != "assistant":
        problems.append((f"{path}.weight", "invalid_value",
                         "only an assistant turn can carry a weight"))
    else:
        message["weight"] = weight


def _tool_calls(calls: list, path: str, problems: list[Problem]) -> list[dict]:
    """OpenAI tool calls, each {"id"?, "type": "function", "function": {"name", "arguments"}},
    with `arguments` (a JSON string in OpenAI's rows) parsed to the object a chat template
    expects (transformers' tool-use convention)."""
    out = []
    for j, call in enumerate(calls):
        where = f"{path}[{j}]"
        if type(call) is not dict:
            problems.append((where, "wrong_type", f"expected an object, got {type_name(call)}"))
            continue
        function = call.get("function")
        if type(function) is not dict:
            problems.append((f"{where}.function", "missing_field" if function is None
                             else "wrong_type", "expected an object with 'name' and 'arguments'"))
            continue
        canonical = _call(function, f"{where}.function", problems)
        if type(call.get("id")) is str:
            canonical = {"id": call["id"], **canonical}
        out.append(canonical)
    return out


def _function_call(content: str, path: str, problems: list[Problem]) -> list[dict]:
    """A LLaMA-Factory function_call turn: JSON, {"name", "arguments"} or a list of them."""
    try:
        value = json.loads(content)
    except ValueError as e:
        problems.append((path, "invalid_json", f"a function_call turn must hold JSON: {e}"))
        return []
    calls = value if type(value) is list else [value]
    out = []
    for j, call in enumerate(calls):
        if type(call) is not dict:
            problems.append((path, "invalid_value",
                             "a function_call turn holds {\"name\", \"arguments\"} (or a list "
                             "of them)"))
            return []
        out.append(_call(call, path if type(value) is dict else f"{path}[{j}]", problems))
    return out


def _call(function: dict, path: str, problems: list[Problem]) -> dict:
    name = string(function, "name", problems, required=True, non_empty=True,
                  path=f"{path}.name")
    arguments = function.get("arguments", MISSING)
    if type(arguments) is str:
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            problems.append((f"{path}.arguments", "invalid_json",
                             f"arguments must be JSON: {e}"))
            arguments = {}
    if arguments is MISSING:
        problems.append((f"{path}.arguments", "missing_field", "missing required field"))
    elif type(arguments) is not dict:
        problems.append((f"{path}.arguments", "wrong_type",
                         f"expected a JSON object, got {type_name(arguments)}"))
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _content(turn: dict, path: str, role: str | None, problems: list[Problem]) -> str:
    """OpenAI content: a string, text parts (joined), or null beside an assistant's tool calls.
    Text only: tunebus trains text models, so an image or audio part is an error."""
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


def tools_of(row: dict, problems: list[Problem]) -> list | None:
    """Tool definitions: a JSON array of objects, or (LLaMA-Factory's way) a string holding one."""
    tools = row.get("tools")
    if type(tools) is str:
        try:
            tools = json.loads(tools) if tools.strip() else []
        except ValueError as e:
            problems.append(("tools", "invalid_json", f"tools must be a JSON array: {e}"))
            return None
    if tools is None:
        return None
    if type(tools) is not list:
        problems.append(("tools", "wrong_type",
                         f"expected an array of tool definitions (or a string holding one), "
                         f"got {type_name(tools)}"))
        return None
    for j, tool in enumerate(tools):
        if type(tool) is not dict:
            problems.append((f"tools[{j}]", "wrong_type",
                             f"expected a tool definition (an object), got {type_name(tool)}"))
    return tools or None


def _chat_warnings(messages: list[dict], key: str) -> list[Warning]:
    """OpenAI turns should run [system], user, assistant, user, assistant, ... (tool results
    answer on the user's side). A break in that does not stop training (and OpenAI does not
    require it), so it is a warning."""
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
            warnings.append(("role_alternation", f"{key}[{i}]: roles do not alternate "
                             f"user/assistant ({broken})"))
            break
        previous = side
    return warnings + _empty_answer(messages)


def _empty_answer(messages: list[dict]) -> list[Warning]:
    if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls")
           for m in messages):
        return [("empty_output", "empty assistant output")]
    return []


class Turn(msgspec.Struct, omit_defaults=True, gc=False):
    """A plain OpenAI turn; encoding it gives exactly the canonical {"role", "content"}."""

    role: str
    content: str
    tool_calls: None = None  # any value other than null: the full check handles the row
    weight: None = None  # likewise


MESSAGES_FIELDS = [("messages", list[Turn]), ("tools", None, None)]


def messages_fast(decode: Callable[[bytes], Any]) -> FastPath:
    """`decode` reads MESSAGES_FIELDS."""
    encode = msgspec.json.encode

    def fast(line: bytes) -> tuple[bytes, int] | None:
        try:
            turns = decode(line).messages
        except Exception:
            return None
        contents = [t.content for t in turns]
        if not _plain_dialogue([t.role for t in turns], contents):
            return None
        return b'{"messages":%b}\n' % encode(turns), sum(map(len, contents))

    return fast


class ShareTurn(msgspec.Struct, gc=False):
    tag: str = msgspec.field(name="from")
    value: str
    weight: None = None  # any value other than null: the full check handles the row


_SHARE_PLAIN = {"human": "user", "gpt": "assistant", "system": "system"}


SHAREGPT_FIELDS = [
    ("conversations", list[ShareTurn]), ("system", str | None, None), ("tools", None, None),
]


def sharegpt_fast(decode: Callable[[bytes], Any]) -> FastPath:
    """`decode` reads SHAREGPT_FIELDS."""
    encode = msgspec.json.encode

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
        return b'{"messages":%b}\n' % encode(list(map(Turn, roles, contents))), \
            sum(map(len, contents))

    return fast


def _plain_dialogue(roles: list, contents: list[str]) -> bool:
    """[system], then user and assistant turns strictly alternating, ending with a non-empty
    answer: a row on which the full check finds nothing to say."""
    start = 1 if roles and roles[0] == "system" else 0
    n = len(roles) - start
    if n < 2 or n % 2:
        return False
    if (roles[start:] if start else roles) != (_DIALOGUES.get(n) or _dialogue(n)):
        return False
    answers = contents[start + 1::2]
    return "" not in answers and not any(map(str.isspace, answers))


_DIALOGUES: dict[int, list[str]] = {}  # n -> ["user", "assistant", ...], n turns


def _dialogue(n: int) -> list[str]:
    return _DIALOGUES.setdefault(n, ["user", "assistant"] * (n // 2))
