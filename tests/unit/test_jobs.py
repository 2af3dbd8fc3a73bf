"""The request digest that tells a resubmission from a different request under one job_id."""

from __future__ import annotations

from tunebus.contracts import TrainingRequested
from tunebus.shared.jobs import content_digest

REQUEST = {"job_id": "j-1", "adapter_name": "bot", "base_model": "s3://models/tiny",
           "dataset": {"uri": "s3://datasets/d.jsonl"}}


def test_the_same_request_written_differently_has_one_digest():
    terse = TrainingRequested.model_validate(REQUEST)
    explicit = TrainingRequested.model_validate(
        REQUEST | {"method": "sft", "backend": "auto", "adapter": {"rank": 8, "type": "lora"},
                   "unknown_field": "ignored"})
    assert content_digest(terse) == content_digest(explicit)


def test_any_difference_that_matters_changes_the_digest():
    base = content_digest(TrainingRequested.model_validate(REQUEST))
    assert content_digest(TrainingRequested.model_validate(REQUEST | {"adapter_name": "other"})) != base
    assert content_digest(TrainingRequested.model_validate(
        REQUEST | {"hyperparameters": {"learning_rate": 0.001}})) != base
