"""The evaluation family: the adapter measured against its base model on held-out data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload


class LossMetrics(Model):
    loss: float = Field(description="Mean token negative log-likelihood.")
    perplexity: float


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
    report_uri: str | None = None


class EvaluationFailed(Payload):
    adapter_name: str
    reason: str


class EvaluationCompletedEvent(Envelope[EvaluationCompleted]):
    type: Literal["tunebus.evaluation.completed.v1"] = "tunebus.evaluation.completed.v1"


class EvaluationFailedEvent(Envelope[EvaluationFailed]):
    type: Literal["tunebus.evaluation.failed.v1"] = "tunebus.evaluation.failed.v1"
