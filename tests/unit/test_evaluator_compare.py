"""The evaluator's arithmetic and scoring: improvements, regressions, probes, examples."""

from __future__ import annotations

import json

import pytest

from tunebus.contracts import Probe
from tunebus.services.evaluator.backend import Answer, Measurement
from tunebus.services.evaluator.compare import compare, metric_change
from tunebus.services.evaluator.examples import BadExample, ProbeCase, probe_cases, read_examples
from tunebus.services.evaluator.scoring import normalise, rouge_l, score


def measurement(loss: float, accuracy: float, answers: list[str]) -> Measurement:
    import math

    return Measurement(loss=loss, perplexity=math.exp(loss), token_accuracy=accuracy, tokens=100,
                       examples=4, answers=[Answer(a, 0.01, 5) for a in answers])


def test_lower_loss_is_an_improvement_and_higher_accuracy_too():
    loss = metric_change("loss", 2.0, 1.5, higher_is_better=False)
    assert loss.absolute_change == -0.5 and loss.relative_change == -0.25
    assert loss.improvement == 0.25 and not loss.regressed
    accuracy = metric_change("token_accuracy", 0.5, 0.4, higher_is_better=True)
    assert accuracy.improvement == pytest.approx(-0.2) and accuracy.regressed


def test_a_change_within_the_tolerance_is_not_a_regression():
    assert not metric_change("loss", 2.0, 2.02, False, tolerance=0.05).regressed
    assert metric_change("loss", 2.0, 2.2, False, tolerance=0.05).regressed


def test_a_metric_from_zero_has_no_relative_change_but_can_still_regress():
    change = metric_change("probe_contains", 0.0, 1.0, higher_is_better=True)
    assert change.relative_change is None and change.absolute_change == 1.0 and not change.regressed
    assert metric_change("probe_contains", 1.0, 0.0, True).regressed


def test_latency_is_reported_but_never_a_regression():
    change = metric_change("probe_latency_s", 0.1, 0.5, higher_is_better=False, informational=True)
    assert change.informational and not change.regressed


def test_compare_counts_a_probe_the_adapter_now_gets_wrong_as_a_regression():
    cases = [ProbeCase([{"role": "user", "content": "Q1"}], "request", expected="blue"),
             ProbeCase([{"role": "user", "content": "Q2"}], "request", expected="42")]
    before = measurement(3.0, 0.2, ["It is blue.", "no idea"])
    after = measurement(1.0, 0.7, ["It is red.", "The answer is 42."])
    result = compare("job-1", "memo", before, after, cases, backend="mlx", max_tokens=16)
    summary = result.summary
    assert summary.improved and summary.metric("loss").improvement == pytest.approx(2 / 3)
    assert [p.regressed for p in result.probes] == [True, False]
    assert summary.probes.regressions == 1 and summary.regressed
    assert summary.metric("probe_contains").before == summary.metric("probe_contains").after == 0.5
    assert "loss" not in summary.regressions


def test_compare_without_probes_flags_only_the_metrics_that_got_worse():
    result = compare("job-1", "memo", measurement(1.0, 0.5, []), measurement(1.2, 0.6, []), [],
                     backend="mlx", max_tokens=16)
    assert result.summary.regressions == ["loss", "perplexity"]
    assert result.summary.probes is None and result.summary.improved is False
    assert result.summary.absolute_change["token_accuracy"] == pytest.approx(0.1)


def test_exact_match_ignores_case_punctuation_and_spacing_and_contains_finds_the_answer():
    case = ProbeCase([{"role": "user", "content": "?"}], "request", expected="Ada Quill")
    assert score(case, "  ada   quill. ").exact_match == 1.0
    wordy = score(case, "It was written by Ada Quill, long ago.")
    assert wordy.exact_match == 0.0 and wordy.contains == 1.0
    assert normalise("Hello,  World!") == "hello, world"


def test_rouge_l_scores_the_longest_common_subsequence():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < rouge_l("the cat sat on the mat", "a cat on a mat") < 1
    assert rouge_l("the cat sat", "dogs bark loudly") == 0.0


def lines(*rows) -> list[str]:
    return [json.dumps(r) for r in rows]


def test_chat_rows_become_a_prompt_and_the_last_assistant_answer():
    [example] = read_examples(lines({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]}), "valid.jsonl")
    assert example.kind == "chat" and example.reference == "Hello."
    assert [m["role"] for m in example.prompt] == ["system", "user"]


def test_prompt_answer_rows_are_scored_by_exact_match_and_rouge():
    examples = read_examples(lines({"prompt": "2+2?", "answer": "4"},
                                   {"prompt": "Say hi", "completion": "hi"}), "valid.jsonl")
    assert [e.kind for e in examples] == ["qa", "chat"]
    assert examples[0].row == {"prompt": "2+2?", "completion": "4"}
    cases = probe_cases(examples, [Probe(prompt="What is in the 42 document?", expected="42")], samples=5)
    assert [(c.source, c.expected, c.reference) for c in cases] == [
        ("request", "42", "42"), ("held_out", "4", "4"), ("held_out", None, "hi")]


def test_a_multi_turn_preference_row_asks_with_its_context_and_scores_the_conversation():
    context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    [example] = read_examples(lines({"prompt": "2+2?", "chosen": "4", "rejected": "5",
                                     "system": "Be brief.", "context": context}), "valid.jsonl")
    assert example.prompt == [{"role": "system", "content": "Be brief."}, *context,
                              {"role": "user", "content": "2+2?"}]
    assert example.row == {"messages": [*example.prompt, {"role": "assistant", "content": "4"}]}


def test_probe_samples_and_max_examples_are_bounded():
    rows = lines(*({"prompt": f"q{i}", "answer": f"a{i}"} for i in range(10)))
    examples = read_examples(rows, "valid.jsonl", limit=6)
    assert len(examples) == 6
    assert len(probe_cases(examples, [], samples=2)) == 2


@pytest.mark.parametrize("row, message", [
    ("{not json", "valid.jsonl:2: invalid JSON"),
    ('{"prompt": "q"}', "valid.jsonl:2: field 'prompt' needs an 'answer'"),
    ('{"messages": [{"role": "user"}]}', "valid.jsonl:2: messages[0] needs string fields"),
    ('{"prompt": 3, "answer": "x"}', "valid.jsonl:2: field 'prompt' must be a string, got int"),
    ('{"title": "x"}', "valid.jsonl:2: row has none of the fields"),
])
def test_a_bad_held_out_row_is_named_by_file_and_line(row, message):
    with pytest.raises(BadExample, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_examples(['{"text": "fine"}', row], "valid.jsonl")
