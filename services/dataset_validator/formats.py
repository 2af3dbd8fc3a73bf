"""The dataset formats tunebus accepts, and how a row of each becomes its canonical form.

Input formats (a row is recognised by its fields; a request may also name the format):

    alpaca             instruction, output; optional input, system, history
                       ([[question, answer], ...]); an empty instruction takes its prompt
                       from input (LLaMA-Factory's converter)
    sharegpt           conversations: [{from, value}] (human, gpt, system, function_call,
                       observation) or [{role, content}], in LLaMA-Factory's role order;
                       optional system, tools (chat.py)
    messages           OpenAI chat: messages: [{role, content, weight?, tool_calls?}];
                       optional tools (chat.py)
    prompt_completion  prompt, completion (strings, or TRL's conversational message lists);
                       optional system
    text               text
    preference         prompt, chosen, rejected in the plain, LLaMA-Factory, OpenAI and TRL
                       (conversational, implicit prompt) shapes (preference.py)
    grpo               prompt (a string or a conversational message list), answer; optional
                       system

Canonical forms, what the trainers read:

    messages    {"messages": [{"role", "content", "weight"?, "tool_calls"?, "tool_call_id"?}],
                 "tools"?: [...]}                                          from the first four
    text        {"text": str}
    preference  {"prompt", "chosen", "rejected", "system"?, "context"?}
    grpo        {"prompt", "answer", "system"?, "context"?}

`prompt` is the last user turn and `context` the turns before it (only for a multi-turn
prompt): a single-turn row is in the shape mlx-lm and mlx-lm-lora load as it is.

Each format has a full check (`Format.normalize`, on decoded JSON: every problem with its field
path, and the warnings) and, for alpaca and the chat formats (chat.py), a fast path
(`Format.fast`) that decodes a JSONL line straight into typed structs with msgspec. The fast
path only ever accepts a row the full check would accept without a warning, and produces the
same bytes; anything else, it hands to the full check. So the full check alone defines what is
valid (tests/unit/test_validation_properties.py holds the two to that).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import chat
from .fields import MISSING, Normalized, Problem, chat_turn, string, type_name
from .preference import preference, split_prompt

FastPath = Callable[[bytes], tuple[bytes, int] | None]  # line -> (canonical JSON + "\n", chars)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # its canonical form: messages, text, preference or grpo
    needs: str  # what a row of this format has, for error messages
    normalize: Callable[[dict], Normalized]
    fast: Callable[[], FastPath] | None = None  # builds a fast path (and its decoder), per run


# The training method decides which formats it can train on.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "sharegpt", "messages", "prompt_completion", "text"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "cpo": ("preference",),
    "grpo": ("grpo",),
}


def methods_for(format: str) -> list[str]:
    return [method for method, formats in METHOD_FORMATS.items() if format in formats]


def detect(row: dict) -> list[str]:
    """The formats whose signature fields `row` has (fields that are null do not count): one
    for a recognisable row, none for an unknown one, several when it mixes structured formats.

    `messages`, `conversations` and alpaca's `instruction`/`output` are strong signatures and
    must not meet in one row. The preference answers (`chosen`, `rejected`, ...) outrank them:
    LLaMA-Factory writes preference rows with `instruction` or `conversations` as the prompt.
    `completion`, `answer` and `text` decide only when none of those is there: Hugging Face's
    alpaca copy, for one, also has a `text`."""
    found = [name for name, keys in _STRONG if any(row.get(k) is not None for k in keys)]
    if "preference" in found:
        return ["preference"]
    if found:
        return found
    for name, key in _WEAK:
        if row.get(key) is not None:
            return [name]
    return []


_STRONG = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("preference", ("chosen", "rejected", "preferred_output", "non_preferred_output")),
]
_WEAK = [("prompt_completion", "completion"), ("grpo", "answer"), ("text", "text")]


def text_of(kind: str, row: dict) -> str:
    """The text whose length is the row's length: what a tokenizer is given for the statistics
    and the max_seq_length warning (a chat template's own markup is not counted)."""
    if kind == "messages":
        return "\n".join(turn["content"] for turn in row["messages"])
    if kind == "text":
        return row["text"]
    context = [turn["content"] for turn in row.get("context", ())]
    if kind == "preference":
        longer = max(row["chosen"], row["rejected"], key=len)
        return "\n".join(filter(None, (row.get("system"), *context, row["prompt"], longer)))
    return "\n".join(filter(None, (row.get("system"), *context, row["prompt"], row["answer"])))


def chars_of(kind: str, row: dict) -> int:
    """Characters of text in a canonical row (what the length filters compare)."""
    if kind == "messages":
        return sum(len(turn["content"]) for turn in row["messages"])
    return sum(len(v) for v in row.values() if type(v) is str) \
        + sum(len(turn["content"]) for turn in row.get("context", ()))


# -- alpaca ----------------------------------------------------------------------------------


def _alpaca(row: dict) -> Normalized:
    problems: list[Problem] = []
    instruction = string(row, "instruction", problems, required=True)
    output = string(row, "output", problems, required=True)
    extra = string(row, "input", problems)
    system = string(row, "system", problems)
    history = _history(row.get("history"), problems)
    if not instruction.strip() and not extra.strip() and type(row.get("instruction")) is str:
        # LLaMA-Factory's converter trains on `input` alone when `instruction` is empty.
        problems.append(("instruction", "empty_value",
                         "must not be empty (unless 'input' holds the prompt)"))
    if problems:
        return None, problems, []
    messages = [chat_turn("system", system)] if system else []
    for question, answer in history:
        messages += [chat_turn("user", question), chat_turn("assistant", answer)]
    prompt = f"{instruction}\n\n{extra}" if extra and instruction.strip() else extra or instruction
    messages.append(chat_turn("user", prompt))
    messages.append(chat_turn("assistant", output))
    warnings = [] if output.strip() else [("empty_output", "empty assistant output")]
    return {"messages": messages}, problems, warnings


def _history(value: Any, problems: list[Problem]) -> list[tuple[str, str]]:
    if value is None:
        return []
    if type(value) is not list:
        problems.append(("history", "wrong_type",
                         f"expected an array of [question, answer] pairs, got {type_name(value)}"))
        return []
    pairs = []
    for i, pair in enumerate(value):
        if type(pair) is not list or len(pair) != 2:
            problems.append((f"history[{i}]", "wrong_type",
                             "expected a [question, answer] pair of strings"))
            continue
        for j, text in enumerate(pair):
            if type(text) is not str:
                problems.append((f"history[{i}][{j}]", "wrong_type",
                                 f"expected a string, got {type_name(text)}"))
        pairs.append((pair[0], pair[1]))
    return pairs


ALPACA_FIELDS = [
    ("instruction", str), ("output", str),
    ("input", str | None, None), ("system", str | None, None), ("history", None, None),
]


def _alpaca_fast(decode: Callable[[bytes], Any]) -> FastPath:
    """`decode` reads ALPACA_FIELDS."""
    encode = msgspec.json.encode
    two = b'{"messages":[{"role":"user","content":%b},{"role":"assistant","content":%b}]}\n'
    three = (b'{"messages":[{"role":"system","content":%b},{"role":"user","content":%b},'
             b'{"role":"assistant","content":%b}]}\n')

    def fast(line: bytes) -> tuple[bytes, int] | None:
        try:
            row = decode(line)
        except Exception:  # malformed, wrongly typed, too deep: the full check says why
            return None
        instruction, output = row.instruction, row.output
        if not instruction or instruction.isspace() or not output or output.isspace():
            return None
        extra, system = row.input, row.system
        user = f"{instruction}\n\n{extra}" if extra else instruction
        if system:
            return three % (encode(system), encode(user), encode(output)), \
                len(system) + len(user) + len(output)
        return two % (encode(user), encode(output)), len(user) + len(output)

    return fast


# -- completion and text ---------------------------------------------------------------------


def _prompt_completion(row: dict) -> Normalized:
    """prompt and completion: strings, or (TRL's conversational prompt/completion) message
    lists, the completion holding the assistant's turns."""
    problems: list[Problem] = []
    if type(row.get("prompt")) is list or type(row.get("completion")) is list:
        return _conversational_completion(row, problems)
    prompt = string(row, "prompt", problems, required=True, non_empty=True)
    completion = string(row, "completion", problems, required=True)
    system = string(row, "system", problems)
    if problems:
        return None, problems, []
    messages = [chat_turn("system", system)] if system else []
    messages += [chat_turn("user", prompt), chat_turn("assistant", completion)]
    warnings = [] if completion.strip() else [("empty_output", "empty completion")]
    return {"messages": messages}, problems, warnings


def _conversational_completion(row: dict, problems: list[Problem]) -> Normalized:
    for key in ("prompt", "completion"):
        if type(row.get(key)) is not list:
            problems.append((key, "wrong_type", "expected a list of messages, as the other of "
                             "prompt and completion is (TRL's conversational prompt/completion)"))
    if problems:
        return None, problems, []
    prompt = chat.openai_turns(row["prompt"], "prompt", problems)
    completion = chat.openai_turns(row["completion"], "completion", problems)
    if not problems and not any(m["role"] == "assistant" for m in completion):
        problems.append(("completion", "no_assistant", "needs an assistant turn"))
    if not problems and not prompt:
        problems.append(("prompt", "empty_value", "must not be empty"))
    if problems:
        return None, problems, []
    system = string(row, "system", problems)
    messages = ([chat_turn("system", system)] if system else []) + prompt + completion
    tools = chat.tools_of(row, problems)
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"messages": messages}
    if tools is not None:
        out["tools"] = tools
    return out, problems, []


def _text(row: dict) -> Normalized:
    problems: list[Problem] = []
    text = string(row, "text", problems, required=True, non_empty=True)
    return (None if problems else {"text": text}), problems, []


# -- GRPO ------------------------------------------------------------------------------------


def _grpo(row: dict) -> Normalized:
    """prompt (a string, or TRL's conversational prompt: a message list ending on a user turn)
    and the reference answer the reward functions compare with."""
    problems: list[Problem] = []
    system = string(row, "system", problems)
    context: list[dict] = []
    if type(row.get("prompt")) is list:
        turns = chat.openai_turns(row["prompt"], "prompt", problems)
        system, context, prompt = split_prompt(turns, "prompt", system, problems)
    else:
        prompt = string(row, "prompt", problems, required=True, non_empty=True)
    answer = row.get("answer", MISSING)
    if type(answer) in (int, float):  # a numeric answer (gsm8k style) is compared as text
        answer = json.dumps(answer)
    else:
        answer = string(row, "answer", problems, required=True, non_empty=True)
    if problems:
        return None, problems, []
    out: dict[str, Any] = {"prompt": prompt, "answer": answer}
    if system:
        out["system"] = system
    if context:
        out["context"] = context
    return out, problems, []


# -- the table -------------------------------------------------------------------------------


def _fast(name: str, fields: list, make: Callable[[Callable], FastPath]) -> Callable[[], FastPath]:
    """Builds a fast path whose decoder reads `fields`, and types the other structured formats'
    signature fields null: a row that carries one fails to decode there and goes to the full
    check, which rejects it as ambiguous, exactly as it would without a fast path."""

    def build() -> FastPath:
        own = {f[0] for f in fields}
        sentinels = [(key, None, None) for other, keys in _STRONG if other != name
                     for key in keys if key not in own]
        row_type = msgspec.defstruct(f"_{name}_row", fields + sentinels, gc=False)
        return make(msgspec.json.Decoder(row_type).decode)

    return build


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("alpaca", "messages", "'instruction' and 'output'", _alpaca,
           _fast("alpaca", ALPACA_FIELDS, _alpaca_fast)),
    Format("sharegpt", "messages", "'conversations'", chat.sharegpt,
           _fast("sharegpt", chat.SHAREGPT_FIELDS, chat.sharegpt_fast)),
    Format("messages", "messages", "'messages'", chat.messages,
           _fast("messages", chat.MESSAGES_FIELDS, chat.messages_fast)),
    Format("prompt_completion", "messages", "'prompt' and 'completion'", _prompt_completion),
    Format("text", "text", "'text'", _text),
    Format("preference", "preference",
           "'prompt', 'chosen' and 'rejected' (or 'input', 'preferred_output' and "
           "'non_preferred_output')", preference),
    Format("grpo", "grpo", "'prompt' and 'answer'", _grpo),
]}
