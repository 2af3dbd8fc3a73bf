"""The evaluation family: the adapter measured against its base model on held-out data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload
from .training import Artifact


class LossMetrics(Model):
    loss: float = Field(description="Mean token negative log-likelihood.")
    perplexity: float
    token_accuracy: float | None = Field(
        default=None, description="Share of scored tokens the model predicts exactly (greedy)."
    )


class MetricChange(Model):
    """One metric of the base model (`before`) and of base+adapter (`after`)."""

    name: str = Field(description="e.g. loss, perplexity, token_accuracy, probe_contains, probe_rouge_l.")
    before: float
    after: float
    absolute_change: float = Field(description="after - before.")
    relative_change: float | None = Field(
        default=None, description="(after - before) / |before|; null when before is 0.")
    higher_is_better: bool
    improvement: float | None = Field(
        default=None, description="Relative change in the good direction: positive is better.")
    regressed: bool = Field(description="The adapter made this metric worse (beyond the tolerance).")
    informational: bool = Field(
        default=False, description="Reported, but not a quality metric (latency): never a regression.")


class ProbeSummary(Model):
    """The generation probes: prompts answered by both models, greedy, at most max_tokens."""

    count: int
    with_reference: int = Field(description="Probes with an expected answer or reference.")
    from_request: int = 0
    from_held_out: int = 0
    max_tokens: int
    regressions: int = Field(default=0, description="Probes the adapter answers worse than the base.")


class EvaluationCompleted(Payload):
    adapter_name: str
    skipped: bool = Field(default=False, description="True when the request turned evaluation off.")
    split: str = "valid"
    examples: int = 0
    tokens: int = 0
    before: LossMetrics | None = None
    after: LossMetrics | None = None
    relative_change: dict[str, float] = Field(
        default={}, description="(after - before) / before per metric; negative loss is better."
    )
    improved: bool | None = None
    report_uri: str | None = Field(default=None, description="The JSON report (evaluation.json).")
    backend: str | None = Field(default=None, description="What ran the evaluation: mlx or torch.")
    absolute_change: dict[str, float] = Field(default={}, description="after - before per metric.")
    metrics: list[MetricChange] = Field(default=[], description="Every metric, before and after.")
    probes: ProbeSummary | None = None
    regressions: list[str] = Field(default=[], description="Names of the metrics that got worse.")
    regressed: bool = Field(default=False, description="A metric or a probe got worse.")
    report_html_uri: str | None = Field(default=None, description="The readable report (evaluation.html).")
    report_artifacts: list[Artifact] = Field(
        default=[], description="The report files with their sha256, stored next to the adapter.")
    seconds: float | None = Field(default=None, description="Wall time of the evaluation.")

    def metric(self, name: str) -> MetricChange | None:
        return next((m for m in self.metrics if m.name == name), None)


class EvaluationFailed(Payload):
    adapter_name: str
    reason: str


class EvaluationCompletedEvent(Envelope[EvaluationCompleted]):
    type: Literal["tunebus.evaluation.completed.v1"] = "tunebus.evaluation.completed.v1"


class EvaluationFailedEvent(Envelope[EvaluationFailed]):
    type: Literal["tunebus.evaluation.failed.v1"] = "tunebus.evaluation.failed.v1"
