"""Experiment trackers on the running stack: a request's TensorBoard event files land in S3 with
its adapter and read back as the progress events the bus carried; an integration no running
worker offers (the stack's trainer has no W&B key) fails the request, saying why."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows
from tests.helpers.trackers import tensorboard_history

pytestmark = pytest.mark.anyio
# What tunebus.services.trainer.trackers.metrics sends, as a client reads it off the bus.
MEASURED = ("epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_second",
            "steady_tokens_per_second", "trained_tokens", "peak_memory_gb", "reward",
            "elapsed_seconds")


def request_body(job_id: str, dataset_uri: str, model_uri: str, integrations: list) -> bytes:
    body = json.loads(training_request(job_id, dataset_uri, model_uri))
    body["data"]["hyperparameters"] |= {"iters": 6}
    body["data"]["evaluation"] = {"enabled": False}
    body["data"]["integrations"] = integrations
    return json.dumps(body).encode()


@pytest.fixture
def dataset_uri(stack, store):
    return upload_rows(store, stack.settings.s3.datasets_bucket,
                       f"uploads/trackers-{uuid.uuid4().hex[:8]}/adder.jsonl", SAMPLE_ROWS)


async def test_tensorboard_event_files_are_stored_with_the_adapter_as_the_progress_said(
        bus, store, dataset_uri, tiny_model_uri, tmp_path):
    nc, events = bus
    job_id = f"tensorboard-{uuid.uuid4().hex[:8]}"
    await publish_request(nc, request_body(job_id, dataset_uri, tiny_model_uri,
                                           [{"type": "tensorboard"}]))
    completed = (await events.wait_for(job_id, ".training.completed", timeout=120))["data"]

    event_files = [a for a in completed["artifacts"] if a["name"].startswith("tensorboard/")]
    assert event_files and all("tfevents" in a["name"] for a in event_files)
    assert all(a["uri"] == f"{completed['adapter_uri']}/{a['name']}" for a in event_files)
    for artifact in event_files:
        store.get_file(artifact["uri"], tmp_path / artifact["name"])

    progress = [p["data"] for p in events.of_job(job_id, ".training.progress")]
    expected = {p["step"]: {k: float(np.float32(p[k])) for k in MEASURED if p.get(k) is not None}
                | {f"metrics/{k}": float(np.float32(v)) for k, v in p["metrics"].items()}
                for p in progress}
    assert tensorboard_history(tmp_path / "tensorboard") == expected
    assert expected[6]["train_loss"] > 0
    # The registry re-reads every artifact (the event files too) before it registers.
    registered = (await events.wait_for(job_id, ".adapter.registered", timeout=60))["data"]
    assert {a["name"] for a in event_files} <= {a["name"] for a in registered["entry"]["artifacts"]}


async def test_an_integration_no_running_worker_offers_fails_the_request_naming_it(
        bus, dataset_uri, tiny_model_uri):
    nc, events = bus
    job_id = f"wandb-{uuid.uuid4().hex[:8]}"
    await publish_request(nc, request_body(job_id, dataset_uri, tiny_model_uri,
                                           [{"type": "wandb", "wandb": {"project": "p"}}]))
    failed = (await events.wait_for(job_id, ".training.failed", timeout=60))["data"]
    assert failed["error_type"] == "unsupported"
    assert failed["reason"] == (
        "no running trainer can serve this request: integration 'wandb' is not offered by the "
        "mlx worker: this worker has no W&B API key (TUNEBUS_TRAINER__TRACKERS__WANDB__API_KEY, "
        "or __MODE=offline)")
    assert not events.of_job(job_id, ".training.started")


def test_event_files_kept_at_a_checkpoint_come_back_when_the_job_resumes(stack, store, tmp_path):
    from tunebus.services.trainer.runner import EventFiles
    from tunebus.services.trainer.trackers import TensorBoardTracker

    first = TensorBoardTracker(tmp_path / "first" / "tensorboard")
    first.start()
    first.writer.add_scalar("train_loss", 0.5, 3)
    first.writer.flush()
    bucket = stack.settings.s3.adapters_bucket
    uri = f"s3://{bucket}/trackers-test/{uuid.uuid4().hex[:8]}/tensorboard"
    EventFiles(store, uri, first.directory).store()  # at a checkpoint, the writer still open
    first.finish("stopped")

    resumed = tmp_path / "resumed" / "tensorboard"
    EventFiles(store, uri, resumed).fetch()
    assert tensorboard_history(resumed) == {3: {"train_loss": 0.5}}
    EventFiles(store, uri + "-none", tmp_path / "none").fetch()  # nothing kept yet: no error
    assert not (tmp_path / "none").exists()
