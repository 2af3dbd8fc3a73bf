"""The reward functions a GRPO-family request can name, in plain Python (no ML library).

Each takes the signature mlx-lm-lora's reward registry uses, so the MLX backend registers them
there as they are (and its own r1_* functions stay available by name); any other backend calls
them directly:

    reward(prompts, completions, answer, types=None) -> list[float]   # one reward per completion

`completions[i]` answers `prompts[i]`, whose reference answer is `answer[i]`. A completion that
wraps its answer in <answer>...</answer> is judged on what is inside the tags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Reward = Callable[..., list[float]]
REWARDS: dict[str, Reward] = {}


def reward(name: str):
    """Register a reward function under `name` (also its __name__, which metrics are named by)."""

    def register(function: Reward) -> Reward:
        function.__name__ = name
        REWARDS[name] = function
        return function

    return register


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_THEN_ANSWER = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)


def extracted_answer(completion: str) -> str:
    """The text inside the last <answer> tags, or the whole completion; stripped."""
    found = _ANSWER.findall(completion)
    return (found[-1] if found else completion).strip()


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


@reward("exact_match")
def exact_match_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                types=None) -> list[float]:
    """1.0 when the answer given equals the reference (case and spacing ignored), else 0.0."""
    return [float(_normalised(extracted_answer(c)) == _normalised(a))
            for c, a in zip(completions, answer)]


@reward("contains")
def contains_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
             types=None) -> list[float]:
    """1.0 when the reference appears anywhere in the completion (case ignored), else 0.0."""
    return [float(bool(_normalised(a)) and _normalised(a) in _normalised(c))
            for c, a in zip(completions, answer)]


@reward("format")
def format_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
           types=None) -> list[float]:
    """1.0 for `<think>…</think> <answer>…</answer>` and nothing else, 0.5 when only the
    <answer> tags are there, else 0.0."""
    return [1.0 if _THINK_THEN_ANSWER.match(c) else 0.5 if _ANSWER.search(c) else 0.0
            for c in completions]


@reward("length")
def length_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
           types=None) -> list[float]:
    """How close the answer given is to the reference's length, in characters: 1.0 at the same
    length, falling towards 0 as it gets longer or shorter (ratio of the shorter to the longer)."""
    rewards = []
    for c, a in zip(completions, answer):
        given, wanted = len(extracted_answer(c)), len(a.strip())
        longer = max(given, wanted)
        rewards.append(min(given, wanted) / longer if longer else 1.0)
    return rewards
