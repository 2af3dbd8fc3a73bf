"""The preference format (DPO, ORPO, CPO) to its canonical rows.

Accepted shapes, each with a multi-turn prompt where its source allows one:

    plain            prompt, chosen, rejected (strings; optional system)
    LLaMA-Factory    instruction [+ input], or conversations ([system,] human, gpt, ..., human:
                     its converter's odd/even rule), with chosen/rejected as strings or
                     {from, value}
    OpenAI (DPO)     input.messages ([system/developer,] user, assistant, ..., user), one
                     assistant message in each of preferred_output and non_preferred_output
    TRL              conversational: prompt, chosen, rejected as message lists; implicit
                     prompt: only chosen and rejected, whole conversations sharing a prefix

The canonical row: {"prompt": the last user turn, "chosen", "rejected": the two answers,
"system"?: the system prompt, "context"?: the turns between the system prompt and the last
user turn}. A single-turn row has no context, so the shapes mlx-lm-lora and TRL read as they
are come out unchanged. An answer is one assistant message of text (tunebus's decision).
"""

from __future__ import annotations

from typing import Any

from .chat import SHAREGPT_ROLES, openai_turns
from .fields import MISSING, Normalized, Problem, Warning, short, string, turn_list


def preference(row: dict) -> Normalized:
    for path, tools in (("tools", row.get("tools")),
                        ("input.tools", (row.get("input") or {}).get("tools")
                         if type(row.get("input")) is dict else None)):
        if tools:  # not silently dropped: the canonical preference row has no place for them
            return None, [(path, "invalid_value", "tool definitions in a preference row are "
                           "not supported (the answers are text)")], []
    if any(k in row for k in ("preferred_output", "non_preferred_output")) and "chosen" not in row:
        return _openai_preference(row)
    problems: list[Problem] = []
    if "prompt" not in row and "instruction" not in row and "conversations" not in row \
            and type(row.get("chosen")) is list and type(row.get("rejected")) is list:
        return _implicit_prompt(row)
    system, context, prompt = _preference_prompt(row, problems)
    chosen = _answer(row, "chosen", problems)
    rejected = _answer(row, "rejected", problems)
    if problems:
        return None, problems, []
    return _pair(prompt, chosen, rejected, system, context)


def _preference_prompt(row: dict, problems: list[Problem]) -> tuple[str, list[dict], str]:
    """(system, context, prompt) of a preference row: `prompt` (a string or TRL's message list),
    LLaMA-Factory's `instruction` (+ `input`), or its `conversations`."""
    system = string(row, "system", problems)
    if type(row.get("prompt")) is list:
        turns = openai_turns(row["prompt"], "prompt", problems)
        return split_prompt(turns, "prompt", system, problems)
    if "prompt" in row or ("instruction" not in row and "conversations" not in row):
        return system, [], string(row, "prompt", problems, required=True, non_empty=True)
    if "instruction" in row:
        instruction = string(row, "instruction", problems, required=True)
        extra = string(row, "input", problems)
        if not instruction.strip() and not extra.strip() and type(row["instruction"]) is str:
            problems.append(("instruction", "empty_value",
                             "must not be empty (unless 'input' holds the prompt)"))
        prompt = f"{instruction}\n\n{extra}" if extra and instruction.strip() else \
            extra or instruction
        return system, [], prompt
    return _sharegpt_prompt(turn_list(row, "conversations", problems), system, problems)


def _sharegpt_prompt(turns: list, system: str,
                     problems: list[Problem]) -> tuple[str, list[dict], str]:
    """LLaMA-Factory's preference conversations: [a system turn,] then human and gpt turns by
    its converter's rule (human/observation at odd positions, gpt/function_call at even ones),
    ending on the human turn that chosen and rejected answer."""
    messages: list[dict] = []
    position = 0
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        tag = turn.get("from", turn.get("role")) if type(turn) is dict else None
        text = turn.get("value", turn.get("content")) if type(turn) is dict else None
        role = SHAREGPT_ROLES.get(tag) if type(tag) is str else None
        if type(text) is not str:
            problems.append((path, "wrong_type",
                             "expected a {from, value} turn with a string value"))
            continue
        if role == "system" and i == 0 and not system:
            system = text
            continue
        if role is None or {"user": 0, "tool": 0, "assistant": 1}.get(role) != position % 2:
            problems.append((path, "role_order",
                             f"{short(str(tag))} at turn {position + 1}: a preference row's "
                             "conversations run human, gpt, ..., human, ending on the human "
                             "turn that chosen and rejected answer (LLaMA-Factory's rule)"))
        messages.append({"role": role or "", "content": text})
        position += 1
    if problems:
        return system, [], ""
    if position % 2 == 0 and turns:
        problems.append((f"conversations[{len(turns) - 1}]", "role_order",
                         "a preference row's conversations end on a human turn, the one chosen "
                         "and rejected answer (LLaMA-Factory's rule)"))
        return system, [], ""
    if turns and not messages[-1]["content"].strip():
        problems.append(("conversations", "empty_value", "needs a non-empty human turn"))
    return system, messages[:-1], messages[-1]["content"] if messages else ""


def split_prompt(turns: list[dict], key: str, system: str,
                 problems: list[Problem]) -> tuple[str, list[dict], str]:
    """Canonical prompt turns as (system, context, prompt): the leading system turns (joined),
    the turns after them, and the last turn, which must be a non-empty user turn."""
    if problems:
        return system, [], ""
    for i, turn in enumerate(turns):
        if set(turn) != {"role", "content"} or turn["role"] == "tool":
            extra = sorted(set(turn) - {"role", "content"}) or ["a tool result"]
            problems.append((f"{key}[{i}]", "invalid_value",
                             f"a prompt's turns are system, user and assistant text; this one has "
                             f"{', '.join(extra)} (weights and tool calls belong to chat rows)"))
            return system, [], ""
    systems = []
    while len(systems) < len(turns) and turns[len(systems)]["role"] == "system":
        systems.append(turns[len(systems)]["content"])
    rest = turns[len(systems):]
    if system and systems:
        problems.append(("system", "invalid_value",
                         f"a system prompt both in 'system' and in '{key}'"))
    elif not rest or rest[-1]["role"] != "user":
        problems.append((key, "invalid_value",
                         "a preference prompt ends on the user turn the answers reply to"))
    elif not rest[-1]["content"].strip():
        problems.append((f"{key}[{len(turns) - 1}].content", "empty_value",
                         "the user turn must not be empty"))
    elif any(t["role"] == "system" for t in rest):
        i = len(systems) + next(j for j, t in enumerate(rest) if t["role"] == "system")
        problems.append((f"{key}[{i}].role", "invalid_value",
                         "a system turn after the conversation started"))
    if problems:
        return system, [], ""
    return system or "\n".join(systems), rest[:-1], rest[-1]["content"]


def _answer(row: dict, key: str, problems: list[Problem]) -> str:
    """A preference answer: a string, LLaMA-Factory's {from, value}, or TRL's list holding one
    assistant message."""
    value = row.get(key)
    if type(value) is list:
        return _single_answer(row, key, problems)
    if type(value) is dict:
        text = value.get("value", value.get("content"))
        if type(text) is str:
            return text
        problems.append((key, "wrong_type", "expected a string, or an object with a string "
                         "'value' (or 'content')"))
        return ""
    return string(row, key, problems, required=True)


def _implicit_prompt(row: dict) -> Normalized:
    """TRL's implicit prompt: chosen and rejected are whole conversations; the turns they share
    from the start are the prompt, and each goes on with one assistant message."""
    problems: list[Problem] = []
    chosen = openai_turns(row["chosen"], "chosen", problems)
    rejected = openai_turns(row["rejected"], "rejected", problems)
    if problems:
        return None, problems, []
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != shared + 1 or turns[-1]["role"] != "assistant":
            problems.append((key, "invalid_value",
                             "without a prompt, chosen and rejected are conversations that "
                             "share every turn but their last, one assistant message each "
                             f"(TRL's implicit prompt); they share {shared} turn"
                             f"{'s' * (shared != 1)}, then {key} has {len(turns) - shared}"))
    if problems:
        return None, problems, []
    system, context, prompt = split_prompt(chosen[:shared], "chosen", "", problems)
    if problems:
        return None, problems, []
    return _pair(prompt, chosen[-1]["content"], rejected[-1]["content"], system, context)


def _openai_preference(row: dict) -> Normalized:
    """OpenAI's DPO rows: input.messages (the prompt: [system/developer turns,] user, assistant,
    ..., user), and one assistant message in each of preferred_output and non_preferred_output."""
    problems: list[Problem] = []
    given = row.get("input", MISSING)
    system, context, prompt = "", [], ""
    if type(given) is not dict:
        problems.append(("input", "missing_field" if given is MISSING else "wrong_type",
                         "expected an object with 'messages'"))
    else:
        turns = turn_list(given, "messages", problems)
        problems[:] = [(f"input.{p}", k, m) for p, k, m in problems]
        turns = openai_turns(turns, "input.messages", problems)
        system, context, prompt = split_prompt(turns, "input.messages", "", problems)
    chosen = _single_answer(row, "preferred_output", problems)
    rejected = _single_answer(row, "non_preferred_output", problems)
    if problems:
        return None, problems, []
    return _pair(prompt, chosen, rejected, system, context)


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


def _pair(prompt: str, chosen: str, rejected: str, system: str,
          context: list[dict]) -> Normalized:
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if system:
        out["system"] = system
    if context:
        out["context"] = context
    warnings: list[Warning] = []
    if not chosen.strip() or not rejected.strip():
        warnings.append(("empty_output", "empty chosen or rejected answer"))
    elif chosen == rejected:
        warnings.append(("identical_pair", "chosen and rejected are identical"))
    return out, [], warnings

