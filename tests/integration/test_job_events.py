"""Job-keyed reads: what a service publishes (and every request it consumes) is kept per job and
kind, so a job's status and the list of jobs do not read the whole events stream."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.helpers.events import wait_until
from tests.helpers.bus import connect
from tunebus.contracts import (
    TrainingProgress,
    TrainingProgressEvent,
    TrainingRequestedEvent,
    TrainingStarted,
    TrainingStartedEvent,
    subjects,
)
from tunebus.shared.bus import consume, create_broker, job_events_recorder, publish, publishes
from tunebus.shared.cli import status as status_cli
from tunebus.shared.jobevents import JobEvents

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).parents[2] / "contracts" / "examples" / "v1"


def request(job_id: str, seed: int = 7) -> TrainingRequestedEvent:
    doc = json.loads((EXAMPLES / "tunebus.training.requested.v1.json").read_text())
    doc["id"] = str(uuid.uuid4())
    doc["subject"] = doc["data"]["job_id"] = job_id
    doc["data"]["hyperparameters"]["seed"] = seed
    return TrainingRequestedEvent.model_validate(doc)


async def test_a_services_events_are_kept_per_job_and_kind_the_latest_of_each(bare_servers, bare_roles):
    job_id = f"je-{uuid.uuid4().hex[:8]}"
    broker, _ = create_broker(bare_servers, "trainer")
    to_started = publishes(broker, TrainingStartedEvent, subjects.TRAINING_STARTED)
    to_progress = publishes(broker, TrainingProgressEvent, subjects.TRAINING_PROGRESS)
    async with broker:
        await broker.start()
        await job_events_recorder(broker).bind(await broker.connect())
        await publish(to_started, TrainingStartedEvent.wrap(
            TrainingStarted(job_id=job_id, adapter_name="a", worker="w", backend="mlx", total_steps=3,
                            resolved_args={}), source="t"))
        for step in (1, 2, 3):
            await publish(to_progress, TrainingProgressEvent.wrap(TrainingProgress(
                job_id=job_id, step=step, total_steps=3, epoch=0.0, train_loss=3.0 - step,
                learning_rate=1e-3, tokens_per_second=10.0), source="t"))
    nc = await connect(bare_servers)
    try:
        events = await JobEvents(nc.jetstream(), await nc.jetstream().key_value(
            subjects.JOB_EVENTS_BUCKET)).of_job(job_id)
        assert [e.type for e in events] == ["tunebus.training.started.v1", "tunebus.training.progress.v1"]
        assert events[-1].data.step == 3
        job, found = await status_cli._job_status(bare_servers, job_id)
        assert found and (job.step, job.total_steps, job.worker) == (3, 3, "w")
        assert job.state == "training 3/3"
        # An identity that may not read the bucket (today's client roles) reads the stream.
        observer = bare_roles.settings("observer", bare_servers)
        job, found = await status_cli._job_status(observer, job_id)
        assert found and job.step == 3
    finally:
        await nc.close()


async def test_the_first_request_a_service_consumes_is_kept_and_a_later_one_does_not_replace_it(bare_servers):
    job_id = f"je-req-{uuid.uuid4().hex[:8]}"
    broker, _ = create_broker(bare_servers, "dataset-validator")
    seen: list[str] = []

    @consume(broker, subjects.TRAINING_REQUESTED, durable=f"test-je-{job_id}", settings=bare_servers)
    async def on_request(event: TrainingRequestedEvent) -> None:
        seen.append(event.id)

    first, second = request(job_id, seed=1), request(job_id, seed=2)
    nc = await connect(bare_servers)
    try:
        async with broker:
            await broker.start()
            await job_events_recorder(broker).bind(await broker.connect())
            for event in (first, second):
                await nc.jetstream().publish(subjects.TRAINING_REQUESTED, event.model_dump_json().encode(),
                                             headers={"Nats-Msg-Id": event.id})
            await wait_until(lambda: second.id in seen, 30, "the second request was not consumed")
        kv = await nc.jetstream().key_value(subjects.JOB_EVENTS_BUCKET)
        kept = json.loads((await kv.get(f"{job_id}.training.requested")).value)
        assert kept["id"] == first.id and kept["data"]["hyperparameters"]["seed"] == 1
    finally:
        await nc.jetstream().delete_consumer(subjects.EVENTS_STREAM, f"test-je-{job_id}")
        await nc.close()


async def test_listing_jobs_reads_each_jobs_latest_events_once(bare_servers):
    nc = await connect(bare_servers)
    try:
        js = nc.jetstream()
        index = JobEvents(js, await js.key_value(subjects.JOB_EVENTS_BUCKET))
        jobs = [f"je-list-{uuid.uuid4().hex[:8]}" for _ in range(3)]
        for job_id in jobs:
            for step in range(5):  # five progress events each: one kept
                await index.record(TrainingProgressEvent.wrap(TrainingProgress(
                    job_id=job_id, step=step + 1, total_steps=5, epoch=0.0, train_loss=1.0,
                    learning_rate=1e-3, tokens_per_second=1.0), source="t").model_dump_json().encode())
        listed = await index.all_jobs()
        assert {job: [e.data.step for e in listed[job]] for job in jobs} == {job: [5] for job in jobs}
        found = {j.job_id: j for j in await status_cli._all_jobs(bare_servers)}
        assert all(found[job].step == 5 for job in jobs)
    finally:
        await nc.close()


async def test_reindexing_fills_the_bucket_from_the_stream(bare_servers):
    job_id = f"je-old-{uuid.uuid4().hex[:8]}"
    nc = await connect(bare_servers)
    try:
        js = nc.jetstream()
        # A job that ran before the services kept their events: in the stream only.
        for step in (1, 2):
            event = TrainingProgressEvent.wrap(TrainingProgress(
                job_id=job_id, step=step, total_steps=2, epoch=0.0, train_loss=1.0,
                learning_rate=1e-3, tokens_per_second=1.0), source="t")
            await js.publish(subjects.TRAINING_PROGRESS, event.model_dump_json().encode())
        index = JobEvents(js, await js.key_value(subjects.JOB_EVENTS_BUCKET))
        assert await index.of_job(job_id) == []
        assert await status_cli._reindex(bare_servers) >= 2
        assert [e.data.step for e in await index.of_job(job_id)] == [2]
    finally:
        await nc.close()
