"""How an adapter compares with its base model: plain arithmetic on the two measurements.

Every metric gets its absolute change (after - before), its relative change, the improvement in
its good direction, and a regression flag; each probe is compared one by one too.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

from tunebus.contracts import EvaluationCompleted, LossMetrics
from tunebus.contracts.evaluation import MetricChange, ProbeSummary

from .backend import Answer, Measurement
from .examples import ProbeCase
from .scoring import ProbeScore, score

# name -> higher is better
QUALITY = {
    "loss": False, "perplexity": False, "token_accuracy": True,
    "probe_exact_match": True, "probe_contains": True, "probe_rouge_l": True,
}
INFORMATIONAL = {"probe_latency_s": False, "probe_answer_tokens": False}


@dataclass(frozen=True)
class ProbeResult:
    case: ProbeCase
    before: Answer
    after: Answer
    before_score: ProbeScore
    after_score: ProbeScore
    regressed: bool


@dataclass(frozen=True)
class Comparison:
    summary: EvaluationCompleted
    probes: list[ProbeResult]


def compare(job_id: str, adapter_name: str, before: Measurement, after: Measurement,
            cases: list[ProbeCase], *, backend: str, max_tokens: int,
            regression_tolerance: float = 0.0, probe_rouge_tolerance: float = 0.1) -> Comparison:
    probes = [
        _probe(case, b, a, probe_rouge_tolerance)
        for case, b, a in zip(cases, before.answers, after.answers, strict=True)
    ]
    values_before = _values(before, [p.before_score for p in probes], before.answers)
    values_after = _values(after, [p.after_score for p in probes], after.answers)
    metrics = [
        metric_change(name, values_before[name], values_after[name], higher,
                      tolerance=regression_tolerance, informational=name in INFORMATIONAL)
        for name, higher in (QUALITY | INFORMATIONAL).items()
        if name in values_before and name in values_after
    ]
    regressions = [m.name for m in metrics if m.regressed]
    probe_regressions = sum(p.regressed for p in probes)
    summary = EvaluationCompleted(
        job_id=job_id,
        adapter_name=adapter_name,
        examples=after.examples,
        tokens=after.tokens,
        before=LossMetrics(loss=before.loss, perplexity=before.perplexity,
                           token_accuracy=before.token_accuracy),
        after=LossMetrics(loss=after.loss, perplexity=after.perplexity,
                          token_accuracy=after.token_accuracy),
        relative_change={m.name: m.relative_change for m in metrics if m.relative_change is not None},
        absolute_change={m.name: m.absolute_change for m in metrics},
        improved=after.loss < before.loss,
        backend=backend,
        metrics=metrics,
        probes=ProbeSummary(
            count=len(probes),
            with_reference=sum(p.case.reference is not None for p in probes),
            from_request=sum(p.case.source == "request" for p in probes),
            from_held_out=sum(p.case.source == "held_out" for p in probes),
            max_tokens=max_tokens,
            regressions=probe_regressions,
        ) if probes else None,
        regressions=regressions,
        regressed=bool(regressions) or probe_regressions > 0,
    )
    return Comparison(summary, probes)


def metric_change(name: str, before: float, after: float, higher_is_better: bool, *,
                  tolerance: float = 0.0, informational: bool = False) -> MetricChange:
    absolute = after - before
    relative = absolute / abs(before) if before else None
    sign = 1 if higher_is_better else -1
    improvement = sign * relative if relative is not None else None
    worse = sign * absolute < 0
    beyond = improvement is None or -improvement > tolerance
    return MetricChange(
        name=name, before=before, after=after, absolute_change=absolute, relative_change=relative,
        higher_is_better=higher_is_better, improvement=improvement,
        regressed=not informational and worse and beyond, informational=informational,
    )


def _probe(case: ProbeCase, before: Answer, after: Answer, rouge_tolerance: float) -> ProbeResult:
    b, a = score(case, before.text), score(case, after.text)
    if b.contains is not None:
        regressed = a.contains < b.contains
    elif b.rouge_l is not None:
        regressed = a.rouge_l < b.rouge_l - rouge_tolerance
    else:
        regressed = False
    return ProbeResult(case, before, after, b, a, regressed)


def _values(m: Measurement, scores: list[ProbeScore], answers: list[Answer]) -> dict[str, float]:
    values = {"loss": m.loss, "perplexity": m.perplexity, "token_accuracy": m.token_accuracy}
    for name, attribute in (("probe_exact_match", "exact_match"), ("probe_contains", "contains"),
                            ("probe_rouge_l", "rouge_l")):
        scored = [getattr(s, attribute) for s in scores if getattr(s, attribute) is not None]
        if scored:
            values[name] = mean(scored)
    if answers:
        values["probe_latency_s"] = mean(a.seconds for a in answers)
        values["probe_answer_tokens"] = mean(a.tokens for a in answers)
    return values
