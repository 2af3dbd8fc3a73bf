"""Adapter references and the promotion policy, as plain functions."""

from __future__ import annotations

import pytest

from tunebus.contracts import EvaluationCompleted, LossMetrics
from tunebus.contracts.evaluation import ProbeSummary
from tunebus.services.adapter_registry.policy import decide
from tunebus.services.adapter_registry.refs import BadRef, Ref, parse_ref
from tunebus.services.evaluator.compare import metric_change
from tunebus.shared.settings import RegistrySettings


@pytest.mark.parametrize("text, ref", [
    ("support-bot", Ref("support-bot")),
    ("support-bot:3", Ref("support-bot", 3)),
    ("support-bot@production", Ref("support-bot", alias="production")),
    ("support-bot@latest", Ref("support-bot", alias="latest")),
])
def test_references_name_a_version_or_an_alias(text, ref):
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text, message", [
    ("support-bot:x", "expected name, name:version or name@alias"),
    ("support-bot@staging", "unknown alias 'staging'"),
    ("support-bot:0", "versions start at 1"),
    ("Support Bot", "bad adapter reference"),
])
def test_a_bad_reference_says_what_is_expected(text, message):
    with pytest.raises(BadRef, match=message):
        parse_ref(text)


def evaluation(loss_before: float, loss_after: float, probe_regressions: int = 0) -> EvaluationCompleted:
    return EvaluationCompleted(
        job_id="job-1", adapter_name="memo",
        before=LossMetrics(loss=loss_before, perplexity=1.0), after=LossMetrics(loss=loss_after, perplexity=1.0),
        metrics=[metric_change("loss", loss_before, loss_after, higher_is_better=False)],
        probes=ProbeSummary(count=3, with_reference=3, max_tokens=16, regressions=probe_regressions),
    )


POLICY = RegistrySettings(promote_min_improvement=0.1)


def test_an_evaluation_that_improves_enough_is_promoted():
    decision = decide(evaluation(2.0, 1.0), POLICY)
    assert decision.promoted and "improved by +50.0%" in decision.reason
    assert decision.policy["min_improvement"] == 0.1


def test_an_improvement_below_the_threshold_is_not_promoted():
    decision = decide(evaluation(2.0, 1.9), POLICY)
    assert not decision.promoted and "less than the required 10.0%" in decision.reason


def test_a_probe_regression_blocks_promotion_unless_allowed():
    assert not decide(evaluation(2.0, 1.0, probe_regressions=1), POLICY).promoted
    allowing = POLICY.model_copy(update={"promote_max_probe_regressions": 1})
    assert decide(evaluation(2.0, 1.0, probe_regressions=1), allowing).promoted


@pytest.mark.parametrize("evaluation_, policy, reason", [
    (None, POLICY, "evaluation failed"),
    (EvaluationCompleted(job_id="j", adapter_name="memo", skipped=True), POLICY, "skipped"),
    (evaluation(2.0, 1.0), RegistrySettings(auto_promote=False), "automatic promotion is off"),
    (evaluation(2.0, 1.0), RegistrySettings(promote_metric="probe_rouge_l"), "no 'probe_rouge_l'"),
])
def test_nothing_to_judge_by_means_no_promotion(evaluation_, policy, reason):
    decision = decide(evaluation_, policy)
    assert not decision.promoted and reason in decision.reason


def test_evaluations_without_the_metric_list_are_judged_by_their_relative_change():
    old_style = EvaluationCompleted(job_id="j", adapter_name="memo", relative_change={"loss": -0.3})
    assert decide(old_style, POLICY).promoted
