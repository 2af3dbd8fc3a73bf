"""A validated dataset as the validator would announce it, for tests that run trainers alone."""

from __future__ import annotations

import nats
from tunebus.contracts import DatasetSummary, DatasetValidated, DatasetValidatedEvent, TrainingRequested


ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(1, 9) for b in range(1, 5)
]


def validated_event(job_id: str, model_uri: str, splits, backend: str) -> DatasetValidatedEvent:
    """What the dataset validator would say about the splits (it is not running here)."""
    request = TrainingRequested.model_validate({
        "job_id": job_id, "adapter_name": "resumer", "base_model": model_uri, "backend": backend,
        "dataset": {"uri": splits["train"].uri},
        "hyperparameters": {"iters": 60, "batch_size": 4, "learning_rate": 0.005,
                            "max_seq_length": 64, "seed": 3},
        "evaluation": {"enabled": False},
    })
    train, valid = splits["train"], splits["valid"]
    dataset = DatasetSummary(
        format="messages", rows=len(ROWS), train_rows=len(ROWS) - 4, valid_rows=4,
        sha256=train.sha256, train_uri=train.uri, train_sha256=train.sha256,
        valid_uri=valid.uri, valid_sha256=valid.sha256, manifest_uri=train.uri)
    return DatasetValidatedEvent.wrap(DatasetValidated(job_id=job_id, request=request, dataset=dataset),
                                      source="tests/validator")


async def publish(nc: nats.NATS, event: DatasetValidatedEvent) -> None:
    await nc.jetstream().publish("tunebus.v1.dataset.validated", event.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": event.id})
