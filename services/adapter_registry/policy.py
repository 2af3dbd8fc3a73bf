"""The promotion policy: does a newly registered version become `production` by itself?

Yes when its evaluation improved the chosen metric over the base model by at least the threshold
and no more probes got worse than allowed (settings.registry). Anything else stays a candidate
for a person to promote by hand.
"""

from __future__ import annotations

from tunebus.contracts import EvaluationCompleted
from tunebus.contracts.registry import Promotion
from tunebus.shared.settings import RegistrySettings


def decide(evaluation: EvaluationCompleted | None, policy: RegistrySettings) -> Promotion:
    rules = {
        "auto_promote": policy.auto_promote,
        "metric": policy.promote_metric,
        "min_improvement": policy.promote_min_improvement,
        "max_probe_regressions": policy.promote_max_probe_regressions,
    }

    def verdict(promoted: bool, reason: str) -> Promotion:
        return Promotion(promoted=promoted, reason=reason, policy=rules)

    if not policy.auto_promote:
        return verdict(False, "automatic promotion is off")
    if evaluation is None:
        return verdict(False, "the evaluation failed, so there is nothing to judge by")
    if evaluation.skipped:
        return verdict(False, "the evaluation was skipped")
    improvement = _improvement(evaluation, policy.promote_metric)
    if improvement is None:
        return verdict(False, f"the evaluation has no {policy.promote_metric!r} to judge by")
    if improvement < policy.promote_min_improvement:
        return verdict(False, f"{policy.promote_metric} improved by {improvement:+.1%}, "
                              f"less than the required {policy.promote_min_improvement:.1%}")
    probe_regressions = evaluation.probes.regressions if evaluation.probes else 0
    if probe_regressions > policy.promote_max_probe_regressions:
        return verdict(False, f"{probe_regressions} probe(s) got worse "
                              f"(at most {policy.promote_max_probe_regressions} allowed)")
    return verdict(True, f"{policy.promote_metric} improved by {improvement:+.1%} "
                         f"(at least {policy.promote_min_improvement:.1%}) and no probe got worse"
                   if probe_regressions == 0 else
                   f"{policy.promote_metric} improved by {improvement:+.1%} "
                   f"with {probe_regressions} probe regression(s) allowed")


def _improvement(evaluation: EvaluationCompleted, metric: str) -> float | None:
    """Relative improvement in the metric's good direction (0.1 = 10 % better)."""
    if found := evaluation.metric(metric):
        return found.improvement
    # Evaluations from before the per-metric list: loss and perplexity, lower is better.
    if metric in evaluation.relative_change:
        return -evaluation.relative_change[metric]
    return None
