"""The dataset family: the validator's verdict on a training request's dataset, and its
request/reply check of a dataset already in S3."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload
from .training import DatasetFormat, DatasetSummary, Method, OnInvalid, S3Uri, TrainingRequested


class RowError(Model):
    file: str
    line: int | None = Field(default=None, description="1-based line in a JSONL file.")
    index: int | None = Field(default=None, description="0-based element in a JSON array file.")
    field: str | None = Field(default=None, description="Path of the offending field, e.g. messages[1].role.")
    message: str
    kind: str | None = Field(
        default=None, description="Stable name of the problem, e.g. invalid_json, wrong_type."
    )


class DatasetValidated(Payload):
    request: TrainingRequested
    dataset: DatasetSummary


class DatasetRejected(Payload):
    reason: str
    errors: list[RowError] = Field(default=[], description="The first errors; see error_count.")
    error_count: int = 0
    error_counts: dict[str, int] = Field(default={}, description="All errors, by kind.")
    request: TrainingRequested | None = None


class DatasetValidatedEvent(Envelope[DatasetValidated]):
    type: Literal["tunebus.dataset.validated.v1"] = "tunebus.dataset.validated.v1"


class DatasetRejectedEvent(Envelope[DatasetRejected]):
    type: Literal["tunebus.dataset.rejected.v1"] = "tunebus.dataset.rejected.v1"


# Request/reply (tunebus.v1.validator.validate): plain JSON bodies, not CloudEvents.


class ValidateDataset(Model):
    """Check a dataset already in S3 the way a training request would, writing nothing."""

    uri: S3Uri = Field(description="A JSONL/JSON file, or a prefix (ending in /) holding "
                       "train, valid and test files.")
    format: DatasetFormat = "auto"
    method: Method | None = Field(
        default=None, description="Check that this method can train on it; null: any method."
    )
    valid_uri: S3Uri | None = None
    on_invalid: OnInvalid = Field(default="reject", description="As in a training request.")
    base_model: str | None = Field(
        default=None, description="Count tokens with this model's tokenizer (else an estimate)."
    )
    max_seq_length: int | None = Field(default=None, ge=8, description="Warn about longer rows.")
    max_errors: int = Field(default=20, ge=1, le=1000)
    preview_rows: int = Field(default=3, ge=0, le=20)


class DatasetReport(Model):
    """The validator's report on a dataset (also what `tunebus validate --json` prints)."""

    valid: bool
    reason: str | None = Field(default=None, description="Why not valid, in one line.")
    format: str | None = Field(default=None, description="The detected (or requested) format.")
    methods: list[str] = Field(default=[], description="Training methods that take this format.")
    rows: int = 0
    train_rows: int = 0
    valid_rows: int = 0
    test_rows: int = 0
    dropped: int = 0
    dropped_reasons: dict[str, int] = {}
    invalid_rows: int = Field(default=0, description="Bad rows left out (on_invalid: drop).")
    invalid_reasons: dict[str, int] = Field(
        default={}, description="Bad rows left out, by the kind of their first error.")
    errors: list[RowError] = Field(default=[], description="The first errors; see error_count.")
    error_count: int = 0
    error_counts: dict[str, int] = Field(default={}, description="All errors, by kind.")
    warnings: list[str] = Field(default=[], description="The first warnings; see warning_count.")
    warning_count: int = 0
    warning_counts: dict[str, int] = {}
    preview: list[dict[str, Any]] = Field(default=[], description="The first rows, canonical.")
    token_stats: dict[str, float] | None = None
    token_counter: str | None = Field(default=None, description="What counted the tokens.")
    sha256: dict[str, str | None] = Field(default={}, description="Per input file.")
