"""The preference format (DPO, ORPO, CPO) to canonical {"prompt", "chosen", "rejected",
"system"?} rows: plain rows, LLaMA-Factory's, and OpenAI's."""

from __future__ import annotations

from .chat import OPENAI_ROLES, SHAREGPT_ROLES
from .fields import MISSING, Normalized, Problem, Warning, short, string, turn_list, type_name


def preference(row: dict) -> Normalized:
    if any(k in row for k in ("preferred_output", "non_preferred_output")) and "chosen" not in row:
        return _openai_preference(row)
    problems: list[Problem] = []
    prompt, system = _preference_prompt(row, problems)
    chosen = _answer(row, "chosen", problems)
    rejected = _answer(row, "rejected", problems)
    if problems:
        return None, problems, []
    return _pair(prompt, chosen, rejected, system)


def _preference_prompt(row: dict, problems: list[Problem]) -> tuple[str, str]:
    """The prompt and system of a preference row: `prompt`, or LLaMA-Factory's `instruction`
    (+ `input`), or its `conversations` holding [a system turn and] one human turn."""
    system = string(row, "system", problems)
    if "prompt" in row or ("instruction" not in row and "conversations" not in row):
        return string(row, "prompt", problems, required=True, non_empty=True), system
    if "instruction" in row:
        instruction = string(row, "instruction", problems, required=True, non_empty=True)
        extra = string(row, "input", problems)
        return (f"{instruction}\n\n{extra}" if extra else instruction), system
    turns = turn_list(row, "conversations", problems)
    prompt = ""
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        tag = turn.get("from", turn.get("role")) if type(turn) is dict else None
        text = turn.get("value", turn.get("content")) if type(turn) is dict else None
        role = SHAREGPT_ROLES.get(tag) if type(tag) is str else None
        if type(text) is not str:
            problems.append((path, "wrong_type",
                             "expected a {from, value} turn with a string value"))
        elif role == "system" and i == 0 and not system:
            system = text
        elif role == "user" and i == len(turns) - 1:
            prompt = text
        else:
            problems.append((path, "invalid_value", "a preference row's conversations hold [a "
                             "system turn and] one human turn, the prompt; got "
                             f"{short(str(tag))} here"))
    if turns and not prompt.strip() and not problems:
        problems.append(("conversations", "empty_value", "needs a non-empty human turn"))
    return prompt, system


def _answer(row: dict, key: str, problems: list[Problem]) -> str:
    """A preference answer: a string, or (LLaMA-Factory's sharegpt style) {from, value}."""
    value = row.get(key)
    if type(value) is dict:
        text = value.get("value", value.get("content"))
        if type(text) is str:
            return text
        problems.append((key, "wrong_type", "expected a string, or an object with a string "
                         "'value' (or 'content')"))
        return ""
    return string(row, key, problems, required=True)


def _openai_preference(row: dict) -> Normalized:
    """OpenAI's DPO rows: input.messages ([system/developer...], one user turn), and one
    assistant message in each of preferred_output and non_preferred_output."""
    problems: list[Problem] = []
    given = row.get("input", MISSING)
    system, prompt = "", ""
    if type(given) is not dict:
        problems.append(("input", "missing_field" if given is MISSING else "wrong_type",
                         "expected an object with 'messages'"))
    else:
        turns = turn_list(given, "messages", problems)
        problems[:] = [(f"input.{p}", k, m) for p, k, m in problems]
        systems, users = [], []
        for i, turn in enumerate(turns):
            path = f"input.messages[{i}]"
            if type(turn) is not dict:
                problems.append((path, "wrong_type", f"expected an object, got {type_name(turn)}"))
                continue
            role = string(turn, "role", problems, required=True, path=f"{path}.role")
            content = string(turn, "content", problems, required=True, path=f"{path}.content")
            if OPENAI_ROLES.get(role) == "system" and not users:
                systems.append(content)
            elif role == "user" and not users:
                users.append(content)
            elif type(turn.get("role")) is str:
                problems.append((f"{path}.role", "invalid_value",
                                 "only [system or developer turns, then] one user turn can "
                                 f"become a preference prompt; got {short(role)} here"))
        if turns and not users and not problems:
            problems.append(("input.messages", "invalid_value", "needs a user turn"))
        system, prompt = "\n".join(systems), "".join(users)
        if users and not prompt.strip():
            problems.append(("input.messages", "empty_value", "the user turn must not be empty"))
    chosen = _single_answer(row, "preferred_output", problems)
    rejected = _single_answer(row, "non_preferred_output", problems)
    if problems:
        return None, problems, []
    return _pair(prompt, chosen, rejected, system)


def _single_answer(row: dict, key: str, problems: list[Problem]) -> str:
    value = row.get(key, MISSING)
    if value is MISSING:
        problems.append((key, "missing_field", "missing required field"))
        return ""
    if type(value) is not list or len(value) != 1 or type(value[0]) is not dict:
        problems.append((key, "wrong_type", "expected an array holding one assistant message"))
        return ""
    turn = value[0]
    if turn.get("role") != "assistant":
        problems.append((f"{key}[0].role", "invalid_value",
                         f"expected 'assistant', got {short(str(turn.get('role')))}"))
    return string(turn, "content", problems, required=True, path=f"{key}[0].content")


def _pair(prompt: str, chosen: str, rejected: str, system: str) -> Normalized:
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if system:
        out["system"] = system
    warnings: list[Warning] = []
    if not chosen.strip() or not rejected.strip():
        warnings.append(("empty_output", "empty chosen or rejected answer"))
    elif chosen == rejected:
        warnings.append(("identical_pair", "chosen and rejected are identical"))
    return out, [], warnings
