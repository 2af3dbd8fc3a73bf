"""The trainer's up-front decisions: what it refuses, and how a request becomes a TrainSpec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunebus.contracts import DatasetSummary, TrainingRequested
from tunebus.services.trainer.plan import refusal, train_spec

EXAMPLES = Path(__file__).parents[2] / "contracts" / "examples" / "v1"


def request(**changes) -> TrainingRequested:
    data = json.loads((EXAMPLES / "tunebus.training.requested.v1.json").read_text())["data"]
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else data.get(key, {}) | value
    return TrainingRequested.model_validate(data)


def dataset(train_rows: int = 100) -> DatasetSummary:
    data = json.loads((EXAMPLES / "tunebus.dataset.validated.v1.json").read_text())["data"]["dataset"]
    return DatasetSummary.model_validate(data | {"train_rows": train_rows})


def test_a_plain_lora_request_is_accepted():
    assert refusal(request(), "mlx") is None


@pytest.mark.parametrize("changes, reason", [
    ({"backend": "cuda"}, "backend 'cuda' was requested; this worker runs 'mlx'"),
    ({"adapter": {"quantization": "4bit"}}, "quantization '4bit' is not supported by the mlx worker"),
])
def test_unsupported_requests_are_refused_with_the_reason(changes, reason):
    assert refusal(request(**changes), "mlx").startswith(reason)


def test_epochs_become_iterations_over_the_training_rows():
    spec = train_spec(request(hyperparameters={"iters": None, "epochs": 3, "batch_size": 4}), dataset(100))
    assert spec.iters == 75


def test_batch_never_exceeds_the_training_rows():
    spec = train_spec(request(hyperparameters={"batch_size": 16}), dataset(5))
    assert spec.batch_size == 5


def test_adapter_settings_pass_through():
    spec = train_spec(request(adapter={"type": "dora", "rank": 4, "alpha": 8.0}), dataset())
    assert (spec.lora.kind, spec.lora.rank, spec.lora.alpha) == ("dora", 4, 8.0)
