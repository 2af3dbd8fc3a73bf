"""The built-in GRPO reward functions, by name, on the signature mlx-lm-lora's registry uses."""

from __future__ import annotations

import pytest
from tunebus.services.trainer.rewards import REWARDS, extracted_answer


def score(name: str, completions: list[str], answers: list[str]) -> list[float]:
    return REWARDS[name](["prompt"] * len(completions), completions, answers)


def test_the_four_built_ins_are_registered_under_their_names():
    assert set(REWARDS) == {"exact_match", "contains", "format", "length"}
    assert all(function.__name__ == name for name, function in REWARDS.items())


def test_an_answer_in_answer_tags_is_judged_on_what_is_inside():
    assert extracted_answer("<think>hmm</think> <answer> 42 </answer>") == "42"
    assert extracted_answer("  just 42 ") == "just 42"


def test_exact_match_ignores_case_and_spacing_only():
    assert score("exact_match", ["<answer>Paris</answer>", "paris ", "Paris, France"],
                 ["paris", "Paris", "Paris"]) == [1.0, 1.0, 0.0]


def test_contains_finds_the_reference_anywhere():
    assert score("contains", ["It is 42.", "forty-two", "anything"], ["42", "42", ""]) == [1.0, 0.0, 0.0]


def test_format_wants_think_then_answer():
    assert score("format", ["<think>a</think>\n<answer>b</answer>", "<answer>b</answer>", "b"],
                 ["b"] * 3) == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("completion, reward", [("abcd", 1.0), ("ab", 0.5), ("abcdefgh", 0.5), ("", 0.0)])
def test_length_is_the_ratio_of_the_shorter_to_the_longer(completion, reward):
    assert score("length", [completion], ["wxyz"]) == [reward]
