"""How one answer is scored against what the data says it should be.

Exact match and contains compare normalised text (case, surrounding punctuation and runs of
whitespace do not count); ROUGE-L is Google's `rouge-score` implementation (F-measure of the
longest common subsequence of tokens).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cache

from .examples import ProbeCase


@dataclass(frozen=True)
class ProbeScore:
    exact_match: float | None = None  # 1.0 or 0.0; None without an expected answer
    contains: float | None = None
    rouge_l: float | None = None  # None without a reference

    @property
    def headline(self) -> float | None:
        """The score a regression is judged on: contains for short answers, else ROUGE-L."""
        return self.contains if self.contains is not None else self.rouge_l


def score(case: ProbeCase, answer: str) -> ProbeScore:
    exact = contains = rouge = None
    if case.expected is not None:
        got, want = normalise(answer), normalise(case.expected)
        exact = float(got == want)
        contains = float(bool(want) and want in got)
    if case.reference is not None:
        rouge = rouge_l(case.reference, answer)
    return ProbeScore(exact, contains, rouge)


def normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.strip(string.punctuation + " ")


def rouge_l(reference: str, answer: str) -> float:
    return _scorer().score(reference, answer)["rougeL"].fmeasure


@cache
def _scorer():
    from rouge_score import rouge_scorer  # evaluator-only dependency (the `mlx` extra)

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
