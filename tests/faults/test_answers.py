"""Every training request gets an answer a submitter can see, never only a log line: a request
without an `id`, a job_id reused for a different request, and a resubmission after a failure.

Only the dataset validator runs here (it is the stage that receives requests), on its own
nats-server and S3 endpoint.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from tunebus.contracts import subjects
from tunebus.shared.cli.status import fold
from tunebus.shared.cli.client import replay
from tunebus.shared.devstack.stack import LocalStack
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

from tests.helpers.bus import connect
from tests.helpers.events import StoredEvents, publish_raw

pytestmark = pytest.mark.anyio
ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
        for a in range(1, 6) for b in range(1, 5)]


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("answers"), settings=Settings(),
                    services=("dataset_validator",), reuse_external=False) as stack:
        yield stack


def request(job_id: str, dataset_uri: str, *, event_id: str | None = None, **data) -> dict:
    return {
        "specversion": "1.0", "id": event_id or str(uuid.uuid4()), "source": "tests/submitter",
        "type": "tunebus.training.requested.v1", "subject": job_id,
        "data": {"job_id": job_id, "adapter_name": "answers", "base_model": "s3://tunebus-models/none",
                 "dataset": {"uri": dataset_uri}, **data},
    }


async def submit(nc, doc: dict) -> None:
    await publish_raw(nc, subjects.TRAINING_REQUESTED, json.dumps(doc).encode(), doc.get("id"))


@pytest.fixture
async def bus(validator):
    nc = await connect(validator.settings)
    events = await StoredEvents().start(validator.settings)
    yield validator, nc, events
    await events.close()
    await nc.close()


def dataset(stack, job_id: str) -> str:
    uri = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/data.jsonl"
    ObjectStore(stack.settings.s3).put_bytes(uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    return uri


async def test_a_request_without_an_id_is_dead_lettered_naming_the_field(bus):
    stack, nc, events = bus
    job_id = f"noid-{uuid.uuid4().hex[:8]}"
    doc = request(job_id, dataset(stack, job_id))
    del doc["id"]
    await submit(nc, doc)
    dead = (await events.wait_for(job_id, ".deadletter.dataset-validator"))[0]["data"]
    assert dead["reason"] == "the envelope lacks id"
    assert dead["errors"] == ["id: required in a received CloudEvents envelope"]
    assert dead["deliveries"] == 1
    assert not events.of(job_id, ".dataset.validated")


async def test_the_same_request_twice_runs_once_and_the_second_is_told_so(bus):
    stack, nc, events = bus
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    first = request(job_id, dataset(stack, job_id))
    await submit(nc, first)
    await events.wait_for(job_id, ".dataset.validated")
    second = request(job_id, first["data"]["dataset"]["uri"])  # the same request, a new event
    await submit(nc, second)
    refused = (await events.wait_for(job_id, ".training.refused"))[0]["data"]
    assert refused["code"] == "duplicate"
    assert (refused["event_id"], refused["original_event_id"]) == (second["id"], first["id"])
    assert refused["request_sha256"] == refused["original_request_sha256"]
    assert len(events.of(job_id, ".dataset.validated")) == 1
    job = fold(job_id, await replay(nc, job_id))
    assert job.stages["validate"].state == "done" and job.refusals[0].startswith("duplicate: ")


async def test_a_job_id_reused_for_a_different_request_is_refused(bus):
    stack, nc, events = bus
    job_id = f"reused-{uuid.uuid4().hex[:8]}"
    uri = dataset(stack, job_id)
    await submit(nc, request(job_id, uri))
    await events.wait_for(job_id, ".dataset.validated")
    other = request(job_id, uri, adapter_name="someone-else")
    await submit(nc, other)
    refused = (await events.wait_for(job_id, ".training.refused"))[0]["data"]
    assert refused["code"] == "conflict" and refused["event_id"] == other["id"]
    assert refused["request_sha256"] != refused["original_request_sha256"]
    assert "submit a new request under a new job_id" in refused["reason"]
    job = fold(job_id, await replay(nc, job_id))
    assert job.adapter_name == "answers"  # the status is the first request's


async def test_a_failed_job_is_retried_under_a_new_job_id_not_its_own(bus):
    stack, nc, events = bus
    job_id = f"failed-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/data.jsonl"
    await submit(nc, request(job_id, uri))  # the dataset is not there yet
    await events.wait_for(job_id, ".dataset.rejected")
    dataset(stack, job_id)

    await submit(nc, request(job_id, uri))
    refused = (await events.wait_for(job_id, ".training.refused"))[0]["data"]
    assert refused["code"] == "duplicate" and "submit it under a new job_id" in refused["reason"]
    retry = f"{job_id}-retry"
    await submit(nc, request(retry, uri))
    await events.wait_for(retry, ".dataset.validated")


async def test_a_request_redelivered_after_its_answer_gets_no_second_answer(bus):
    stack, nc, events = bus
    job_id = f"again-{uuid.uuid4().hex[:8]}"
    doc = request(job_id, dataset(stack, job_id))
    await submit(nc, doc)
    await events.wait_for(job_id, ".dataset.validated")
    await publish_raw(nc, subjects.TRAINING_REQUESTED, json.dumps(doc).encode())  # same event id
    marker = request(f"{job_id}-after", doc["data"]["dataset"]["uri"])
    await submit(nc, marker)  # served after the repeat: once it is answered, the repeat was too
    await events.wait_for(marker["subject"], ".dataset.validated")
    assert not events.of(job_id, ".training.refused")
    assert len(events.of(job_id, ".dataset.validated")) == 1


async def test_the_submitter_following_its_request_sees_the_refusal_not_the_earlier_job(bus):
    from tunebus.contracts import TrainingRequested
    from tunebus.shared.cli.client import follow, submit as client_submit

    stack, nc, events = bus
    job_id = f"follow-{uuid.uuid4().hex[:8]}"
    first = request(job_id, dataset(stack, job_id))
    await submit(nc, first)
    await events.wait_for(job_id, ".dataset.validated")
    again = await client_submit(nc, TrainingRequested.model_validate(first["data"] | {"adapter_name": "other"}))
    async with asyncio.timeout(30):
        seen = [event async for event in follow(nc, job_id, answering=again.id)]
    assert [e.type for e in seen] == ["tunebus.training.requested.v1", "tunebus.training.refused.v1"]
    assert seen[-1].data.code == "conflict" and seen[-1].data.event_id == again.id
