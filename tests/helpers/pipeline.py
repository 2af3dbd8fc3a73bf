"""A training request through the whole pipeline: its rows in S3, its body, its publication."""

from __future__ import annotations

import json
import uuid

import nats


SAMPLE_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    for a in range(1, 9) for b in range(1, 5)
]


def training_request(job_id: str, dataset_uri: str, model_uri: str, *, event_id: str | None = None) -> bytes:
    """A TrainingRequested event written by hand from the documented schema (no project code)."""
    return json.dumps({
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": "tests/external-system",
        "type": "tunebus.training.requested.v1",
        "subject": job_id,
        "time": "2026-11-21T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "job_id": job_id,
            "adapter_name": "e2e-adder",
            "base_model": model_uri,
            "dataset": {"uri": dataset_uri},
            "adapter": {"type": "lora", "rank": 8, "alpha": 16},
            "hyperparameters": {"iters": 40, "batch_size": 4, "learning_rate": 0.005,
                                "max_seq_length": 128, "seed": 1},
        },
    }).encode()


def upload_rows(store, bucket: str, key: str, rows: list[dict] | str) -> str:
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    uri = f"s3://{bucket}/{key}"
    store.put_bytes(uri, text.encode())
    return uri


async def publish_request(nc: nats.NATS, body: bytes, msg_id: str | None = None) -> None:
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await nc.jetstream().publish("tunebus.v1.training.requested", body, headers=headers)
