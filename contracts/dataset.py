"""The dataset family: the validator's verdict on a training request's dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload
from .training import DatasetSummary, TrainingRequested


class RowError(Model):
    file: str
    line: int | None = Field(default=None, description="1-based line in a JSONL file.")
    index: int | None = Field(default=None, description="0-based element in a JSON array file.")
    field: str | None = Field(default=None, description="Path of the offending field, e.g. messages[1].role.")
    message: str


class DatasetValidated(Payload):
    request: TrainingRequested
    dataset: DatasetSummary


class DatasetRejected(Payload):
    reason: str
    errors: list[RowError] = Field(default=[], description="The first errors; see error_count.")
    error_count: int = 0
    request: TrainingRequested | None = None


class DatasetValidatedEvent(Envelope[DatasetValidated]):
    type: Literal["tunebus.dataset.validated.v1"] = "tunebus.dataset.validated.v1"


class DatasetRejectedEvent(Envelope[DatasetRejected]):
    type: Literal["tunebus.dataset.rejected.v1"] = "tunebus.dataset.rejected.v1"
