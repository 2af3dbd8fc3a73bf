"""End to end over the real stack: a training request, published with plain nats-py as any
external system would, becomes a validated dataset, a trained adapter, an evaluation and a
registry entry whose files download byte for byte."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
import uuid

import boto3
import nats
import pytest

from tests.helpers.events import EventLog, consumer_idle, wait_until
from tests.helpers.bus import connect
from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows

pytestmark = pytest.mark.anyio


async def test_training_request_becomes_an_evaluated_registered_adapter(stack, store, tiny_model_uri):
    s3 = stack.settings.s3
    job_id = f"e2e-{uuid.uuid4().hex[:8]}"
    dataset_uri = upload_rows(store, s3.datasets_bucket, f"uploads/{job_id}/adder.jsonl", SAMPLE_ROWS)
    # As an outside system would: the submitter's identity, nothing more.
    nc = await connect(stack.as_role("submitter"))
    events = await EventLog().start(nc)
    try:
        await publish_request(nc, training_request(job_id, dataset_uri, tiny_model_uri))

        validated = await events.wait_for(job_id, ".dataset.validated")
        assert validated["data"]["dataset"]["rows"] == len(SAMPLE_ROWS)
        assert validated["data"]["dataset"]["valid_rows"] >= 1

        completed = (await events.wait_for(job_id, ".training.completed", timeout=300))["data"]
        assert completed["metrics"]["final_loss"] < completed["metrics"]["first_loss"]
        progress = events.of_job(job_id, ".training.progress")
        steps = [p["data"]["step"] for p in progress]
        assert steps and steps == sorted(steps) and steps[-1] == 40

        evaluation = (await events.wait_for(job_id, ".evaluation.completed", timeout=300))["data"]
        assert evaluation["after"]["perplexity"] < evaluation["before"]["perplexity"]

        # Every artifact in S3 is what the event says it is.
        for artifact in completed["artifacts"]:
            bucket, key = artifact["uri"].removeprefix("s3://").split("/", 1)
            body = store.client.get_object(bucket, key).read()
            assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
        assert {"adapters.safetensors", "adapter_config.json"} <= {a["name"] for a in completed["artifacts"]}

        registered = (await events.wait_for(job_id, ".adapter.registered"))["data"]["entry"]
        assert registered["name"] == "e2e-adder" and registered["job_id"] == job_id

        reply = await nc.request("tunebus.v1.registry.get", json.dumps({"ref": registered["ref"]}).encode(), timeout=10)
        entry = json.loads(reply.data)["entry"]
        assert entry["dataset_sha256"] == completed["dataset"]["sha256"]
        assert entry["evaluation"]["after"]["loss"] == evaluation["after"]["loss"]

        reply = await nc.request("tunebus.v1.registry.download-url",
                                 json.dumps({"ref": registered["ref"]}).encode(), timeout=10)
        urls = json.loads(reply.data)
        weights_url = urls["urls"]["adapters.safetensors"]
        downloaded = await asyncio.to_thread(lambda: urllib.request.urlopen(weights_url).read())
        assert hashlib.sha256(downloaded).hexdigest() == urls["sha256"]["adapters.safetensors"]

        # Any S3 client works on the documented layout, e.g. boto3.
        s3_client = boto3.client(
            "s3", endpoint_url=s3.endpoint, region_name=s3.region,
            aws_access_key_id=s3.access_key.get_secret_value(),
            aws_secret_access_key=s3.secret_key.get_secret_value(),
        )
        bucket, key = completed["adapter_uri"].removeprefix("s3://").split("/", 1)
        body = s3_client.get_object(Bucket=bucket, Key=f"{key}/adapters.safetensors")["Body"].read()
        assert body == downloaded

        # The same job_id again (a new event, so JetStream's de-duplication does not catch it)
        # starts no second job.
        await publish_request(nc, training_request(job_id, dataset_uri, tiny_model_uri))
        await wait_until(lambda: len(events.of_job(job_id, ".training.requested")) == 2, 10, "second request")
        await wait_until_idle(nc, "dataset-validator")
        assert len(events.of_job(job_id, ".dataset.validated")) == 1
        assert len(events.of_job(job_id, ".training.started")) == 1
    finally:
        await nc.close()


async def test_repeated_publish_of_one_event_is_stored_once(stack, store):
    s3 = stack.settings.s3
    job_id = f"dup-{uuid.uuid4().hex[:8]}"
    body = training_request(job_id, f"s3://{s3.datasets_bucket}/missing/{job_id}.jsonl", "s3://x/y")
    event_id = json.loads(body)["id"]
    nc = await connect(stack.settings)
    try:
        js = nc.jetstream()
        first = await js.publish("tunebus.v1.training.requested", body, headers={"Nats-Msg-Id": event_id})
        second = await js.publish("tunebus.v1.training.requested", body, headers={"Nats-Msg-Id": event_id})
        assert not first.duplicate and second.duplicate and first.seq == second.seq
    finally:
        await nc.close()


async def test_missing_dataset_is_rejected_with_a_clear_reason(stack, tiny_model_uri):
    job_id = f"missing-{uuid.uuid4().hex[:8]}"
    missing = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/nope.jsonl"
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await publish_request(nc, training_request(job_id, missing, tiny_model_uri))
        rejected = (await events.wait_for(job_id, ".dataset.rejected"))["data"]
        assert rejected["reason"] == f"dataset {missing} does not exist"
    finally:
        await nc.close()


async def test_bad_rows_are_rejected_with_file_line_and_field(stack, store, tiny_model_uri):
    s3 = stack.settings.s3
    job_id = f"badrows-{uuid.uuid4().hex[:8]}"
    text = (
        '{"instruction": "a", "output": "b"}\n'
        '{"instruction": "c", "output": "d"}\n'
        '{"instruction": "e", "output": 5}\n'
        '{"instruction": "f", "output": "g"\n'
    )
    uri = upload_rows(store, s3.datasets_bucket, f"uploads/{job_id}/bad.jsonl", text)
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await publish_request(nc, training_request(job_id, uri, tiny_model_uri))
        rejected = (await events.wait_for(job_id, ".dataset.rejected"))["data"]
        assert rejected["error_count"] == 2
        first, second = rejected["errors"]
        assert (first["file"], first["line"], first["field"]) == (uri, 3, "output")
        assert second["line"] == 4 and "invalid JSON" in second["message"]
        assert not events.of_job(job_id, ".training.started")
    finally:
        await nc.close()


async def test_payload_failing_its_schema_is_dead_lettered_and_the_service_keeps_serving(stack, tiny_model_uri):
    bad_job = f"schema-{uuid.uuid4().hex[:8]}"
    next_job = f"after-{uuid.uuid4().hex[:8]}"
    body = json.loads(training_request(bad_job, "s3://tunebus-datasets/x.jsonl", tiny_model_uri))
    body["data"]["hyperparameters"]["learning_rate"] = "fast"  # wrong type
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await publish_request(nc, json.dumps(body).encode())
        await publish_request(nc, b"this is not JSON at all")
        missing = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{next_job}/nope.jsonl"
        await publish_request(nc, training_request(next_job, missing, tiny_model_uri))

        dead = await events.wait_for(bad_job, ".deadletter.dataset-validator")
        assert dead["data"]["reason"] == "payload does not match its schema"
        assert any("learning_rate" in e for e in dead["data"]["errors"])
        assert dead["data"]["original_subject"] == "tunebus.v1.training.requested"
        assert json.loads(__import__("base64").b64decode(dead["data"]["body_base64"])) == body
        await events.wait_for("unknown", ".deadletter.dataset-validator")
        # ... and the next message is served as usual.
        await events.wait_for(next_job, ".dataset.rejected")
    finally:
        await nc.close()


async def wait_until_idle(nc: nats.NATS, durable: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await consumer_idle(nc, durable):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"consumer {durable} still busy after {timeout}s")
        await asyncio.sleep(0.2)


async def test_a_trainer_stopped_mid_job_hands_it_back_and_the_job_completes(stack, store, tiny_model_uri):
    s3 = stack.settings.s3
    job_id = f"handback-{uuid.uuid4().hex[:8]}"
    dataset_uri = upload_rows(store, s3.datasets_bucket, f"uploads/{job_id}/adder.jsonl", SAMPLE_ROWS)
    body = json.loads(training_request(job_id, dataset_uri, tiny_model_uri))
    # Long enough that the SIGTERM after the first progress report lands mid-run (it stops within
    # a step or two), short enough that the run after the hand-back costs seconds.
    body["data"]["hyperparameters"]["iters"] = 100
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await publish_request(nc, json.dumps(body).encode())
        await events.wait_for(job_id, ".training.progress", timeout=120)

        trainer = stack.service("trainer")
        trainer.proc.terminate()  # SIGTERM: a clean shutdown, as an orchestrator would do
        await asyncio.to_thread(trainer.proc.wait, 30)
        assert trainer.proc.returncode == 0
        assert not events.of_job(job_id, ".training.completed")
        assert not events.of_job(job_id, ".training.failed")

        stack.restart("trainer")
        completed = (await events.wait_for(job_id, ".training.completed", timeout=300))["data"]
        assert completed["metrics"]["steps"] == 100
        await events.wait_for(job_id, ".adapter.registered", timeout=120)
        assert len(events.of_job(job_id, ".training.started")) == 2  # once per worker
        assert len(events.of_job(job_id, ".training.completed")) == 1
    finally:
        await nc.close()
