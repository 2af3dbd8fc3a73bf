"""What the evaluator scores: held-out rows read into examples, and the probes to answer.

Plain data, no I/O and no ML library. A held-out row is one of the shapes the trainer reads:

    {"messages": [...]}                      chat/instruction data: scored by ROUGE-L
    {"prompt": ..., "completion": ...}       completions: scored by ROUGE-L
    {"prompt": ..., "answer": ...}           prompt/answer data: exact match and contains
    {"prompt": ..., "chosen": ...}           preference data: the chosen answer is the reference
    {"text": ...}                            plain text: loss only, nothing to answer

A prompt row's `context` (earlier turns of a multi-turn prompt) comes before the prompt; such a
row's loss is computed on the whole conversation, as a chat row's.

Each example keeps the row the loss is computed on (mlx-lm-lora's SFT dataset shapes), and,
when it has one, the conversation up to the answer and the reference answer for the probes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tunebus.contracts import Probe

Kind = Literal["chat", "qa", "text"]


class BadExample(ValueError):
    """A held-out row the evaluator cannot read; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    row: dict  # what the loss is computed on
    kind: Kind
    prompt: list[dict] | None = None  # the conversation up to the answer
    reference: str | None = None  # the answer the data gives


@dataclass(frozen=True)
class ProbeCase:
    """One prompt answered by the base model and by base+adapter."""

    prompt: list[dict]  # chat messages, the last one the user's
    source: Literal["request", "held_out"]
    expected: str | None = None  # a short answer: exact-match and contains accuracy
    reference: str | None = None  # a reference answer: ROUGE-L

    @property
    def question(self) -> str:
        return self.prompt[-1]["content"]


def read_examples(lines: Iterable[str], source: str, limit: int | None = None) -> list[Example]:
    """Examples from JSONL lines (blank lines skipped), at most `limit` of them."""
    examples: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BadExample(f"{source}:{lineno}: invalid JSON ({e})") from None
        examples.append(example_of(row, f"{source}:{lineno}"))
    kinds = {e.kind for e in examples}
    if "text" in kinds and len(kinds) > 1:
        raise BadExample(f"{source}: plain-text rows mixed with prompt/answer rows")
    return examples


def example_of(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise BadExample(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _chat(row, where)
    if "prompt" in row:
        prompt = _string(row, "prompt", where)
        context = row.get("context") or []  # earlier turns of a multi-turn prompt
        conversation = _with_system(row, [*context, {"role": "user", "content": prompt}], where)
        for key, kind in (("answer", "qa"), ("completion", "chat"), ("chosen", "chat")):
            if key in row:
                answer = _string(row, key, where)
                scored = {"messages": [*conversation, {"role": "assistant", "content": answer}]} \
                    if context else {"prompt": prompt, "completion": answer}
                return Example(scored, kind, conversation, answer)
        raise BadExample(f"{where}: field 'prompt' needs an 'answer', 'completion' or 'chosen' beside it")
    if "text" in row:
        return Example({"text": _string(row, "text", where)}, "text")
    raise BadExample(f"{where}: row has none of the fields messages, prompt, text")


def probe_cases(examples: list[Example], requested: list[Probe], samples: int) -> list[ProbeCase]:
    """The request's probes first, then the first `samples` held-out examples with an answer."""
    cases = [
        ProbeCase([{"role": "user", "content": p.prompt}], "request", p.expected, p.expected)
        for p in requested
    ]
    answerable = [e for e in examples if e.prompt and e.reference is not None]
    for e in answerable[:samples]:
        expected = e.reference if e.kind == "qa" else None
        cases.append(ProbeCase(e.prompt, "held_out", expected, e.reference))
    return cases


def _chat(row: dict, where: str) -> Example:
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        raise BadExample(f"{where}: field 'messages' must be a non-empty array")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)):
            raise BadExample(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return Example({"messages": turns}, "chat")
    return Example({"messages": turns}, "chat", turns[:last], turns[last]["content"])


def _with_system(row: dict, conversation: list[dict], where: str) -> list[dict]:
    if row.get("system"):
        return [{"role": "system", "content": _string(row, "system", where)}, *conversation]
    return conversation


def _string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise BadExample(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value
