"""The delivery policy on a real nats-server: retries with backoff, dead letters, heartbeats."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import pytest
from faststream.nats.annotations import NatsMessage

from tests.helpers.bus import connect
from tunebus.contracts import TrainingFailed, TrainingFailedEvent, subjects
from tunebus.shared.bus import consume, create_broker, ensure_streams, publish, publishes
from tunebus.shared.delivery import PermanentError
from tunebus.shared.settings import DeliverySettings

pytestmark = pytest.mark.anyio
SUBJECT = subjects.TRAINING_FAILED  # any event subject will do; the handlers below are the tests'


def fast_settings(bare_servers, **delivery):
    defaults = dict(ack_wait_s=2.0, heartbeat_s=0.5, max_deliveries=3,
                    retry_base_delay_s=0.1, retry_max_delay_s=0.2)
    return bare_servers.model_copy(update={"delivery": DeliverySettings(**defaults | delivery)})


async def run_consumer(settings, handle, durable: str | None = None):
    """A broker with one durable consumer of SUBJECT whose handler is `handle(event, msg)`."""
    broker, _ = create_broker(settings, "delivery-test")
    durable = durable or f"test-{uuid.uuid4().hex[:8]}"

    @consume(broker, SUBJECT, durable=durable, settings=settings)
    async def handler(event: TrainingFailedEvent, msg: NatsMessage) -> None:
        await handle(event, msg)

    to_subject = publishes(broker, TrainingFailedEvent, SUBJECT)
    nc = await broker.connect()
    await ensure_streams(nc)
    await broker.start()
    return broker, to_subject


async def send(publisher, job_id: str) -> None:
    await publish(publisher, TrainingFailedEvent.wrap(TrainingFailed(job_id=job_id, reason="x"), source="test"))


async def dead_letters(settings, job_id: str) -> list[dict]:
    nc = await connect(settings)
    try:
        sub = await nc.jetstream().subscribe(f"{subjects.DEAD_LETTER}.>", ordered_consumer=True)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return found
            body = json.loads(msg.data)
            if body["subject"] == job_id:
                found.append(body["data"])
    finally:
        await nc.close()


async def test_a_transient_failure_is_retried_until_it_succeeds(bare_servers):
    settings = fast_settings(bare_servers)
    job_id = f"retry-{uuid.uuid4().hex[:8]}"
    deliveries: list[int] = []
    done = asyncio.Event()

    async def handle(event, msg):
        if event.data.job_id != job_id:
            return
        deliveries.append(msg.raw_message.metadata.num_delivered)
        if len(deliveries) < 3:
            raise ConnectionError("S3 is briefly unreachable")
        done.set()

    broker, out = await run_consumer(settings, handle)
    try:
        await send(out, job_id)
        await asyncio.wait_for(done.wait(), 20)
        assert deliveries == [1, 2, 3]
        assert await dead_letters(settings, job_id) == []
    finally:
        await broker.stop()


async def test_a_permanent_error_is_dead_lettered_at_once(bare_servers):
    settings = fast_settings(bare_servers)
    job_id = f"perm-{uuid.uuid4().hex[:8]}"
    calls = []

    async def handle(event, msg):
        if event.data.job_id == job_id:
            calls.append(1)
            raise PermanentError("the base model has no safetensors weights")

    broker, out = await run_consumer(settings, handle)
    try:
        await send(out, job_id)
        letters = await wait_until_dead_lettered(settings, job_id)
        assert letters[0]["reason"] == "the base model has no safetensors weights"
        assert letters[0]["service"] == "delivery-test"
        await asyncio.sleep(1.0)  # time for a (wrong) redelivery to show
        assert calls == [1]
    finally:
        await broker.stop()


async def test_retries_are_bounded_and_then_dead_lettered(bare_servers):
    settings = fast_settings(bare_servers, max_deliveries=3)
    job_id = f"bounded-{uuid.uuid4().hex[:8]}"
    calls = []

    async def handle(event, msg):
        if event.data.job_id == job_id:
            calls.append(msg.raw_message.metadata.num_delivered)
            raise RuntimeError("always broken")

    broker, out = await run_consumer(settings, handle)
    try:
        await send(out, job_id)
        letters = await wait_until_dead_lettered(settings, job_id)
        assert letters[0]["reason"].startswith("failed 3 times")
        assert letters[0]["deliveries"] == 3
        assert calls == [1, 2, 3]
    finally:
        await broker.stop()


async def test_long_work_sends_heartbeats_so_no_second_worker_takes_it(bare_servers):
    settings = fast_settings(bare_servers, ack_wait_s=1.0, heartbeat_s=0.25)
    job_id = f"long-{uuid.uuid4().hex[:8]}"
    durable = f"test-{uuid.uuid4().hex[:8]}"
    deliveries = []
    done = asyncio.Event()

    async def handle(event, msg):
        if event.data.job_id != job_id:
            return
        deliveries.append(msg.raw_message.metadata.num_delivered)
        await asyncio.sleep(3.0)  # three times ack_wait
        done.set()

    # Two workers share the durable consumer: without heartbeats the second would receive the
    # message again once ack_wait passed while the first is still working on it.
    first, out = await run_consumer(settings, handle, durable)
    second, _ = await run_consumer(settings, handle, durable)
    try:
        await send(out, job_id)
        await asyncio.wait_for(done.wait(), 20)
        await asyncio.sleep(1.5)
        assert deliveries == [1]
    finally:
        await first.stop()
        await second.stop()


async def wait_until_dead_lettered(settings, job_id: str, timeout: float = 20.0) -> list[dict]:
    found: list[dict] = []

    async def poll():
        found[:] = await dead_letters(settings, job_id)
        return found

    deadline = asyncio.get_running_loop().time() + timeout
    while not await poll():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no dead letter for {job_id}")
    return found


