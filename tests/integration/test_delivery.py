"""The delivery policy on a real nats-server: retries with backoff, dead letters, heartbeats."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid

import nats
import pytest
from faststream.nats.annotations import NatsMessage
from nats.js.api import ConsumerConfig

from tests.helpers.bus import connect
from tunebus.contracts import TrainingFailed, TrainingFailedEvent, subjects
from tunebus.shared.bus import consume, create_broker, ensure_streams, publish, publishes
from tunebus.shared.delivery import PermanentError
from tunebus.shared.settings import DeliverySettings

from tests.helpers.bus import connect
from tests.helpers.faults import poison

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




async def test_poison_of_every_kind_is_dead_lettered_at_first_sight(bare_servers):
    settings = fast_settings(bare_servers)
    handled = []

    async def handle(event, msg):
        if event.data.job_id == "poisoned":  # every poison message says it is of this job
            handled.append(event.id)

    broker, _ = await run_consumer(settings, handle)
    nc = await connect(settings)
    valid = TrainingFailedEvent.wrap(TrainingFailed(job_id="poisoned", reason="x"), source="test")
    bodies = poison(valid.model_dump_json().encode())
    ids = {kind: f"poison-{uuid.uuid4().hex[:8]}" for kind in bodies}
    try:
        for kind, body in bodies.items():
            await nc.jetstream().publish(SUBJECT, body, headers={"Nats-Msg-Id": ids[kind]})
        letters = await wait_until_dead_lettered_by_msg_id(settings, set(ids.values()))
    finally:
        await broker.stop()
        await nc.close()
    by_kind = {kind: letters[ids[kind]] for kind in bodies}
    assert all(letter["deliveries"] == 1 for letter in by_kind.values())
    assert by_kind["deep nesting"]["errors"] == ["<body>: nested too deeply to parse"]
    assert "not UTF-8" in by_kind["not utf-8"]["errors"][0]
    assert "not JSON" in by_kind["not json"]["errors"][0]
    assert by_kind["not an object"]["reason"] == "the body is not a CloudEvents envelope"
    assert by_kind["missing id"]["reason"] == "the envelope lacks id"
    assert by_kind["missing id"]["errors"] == ["id: required in a received CloudEvents envelope"]
    large = by_kind["900 KB"]
    assert large["reason"] == "the envelope lacks type"
    assert not large["body_complete"] and large["body_size"] == len(bodies["900 KB"])
    assert large["body_sha256"] == hashlib.sha256(bodies["900 KB"]).hexdigest()
    assert base64.b64decode(large["body_base64"]) == bodies["900 KB"][:1024]
    assert large["stream_sequence"] > 0
    assert base64.b64decode(by_kind["not json"]["body_base64"]) == bodies["not json"]
    assert handled == []


async def test_a_message_jetstream_gives_up_on_is_dead_lettered_from_the_stream(bare_servers, bare_roles):
    """A handler that never returns (it kills its process each time) exhausts max_deliver; the
    MAX_DELIVERIES advisory is the only sign of it, and the policy dead-letters the message. The
    watch runs as a service's identity: its permissions allow it."""
    settings = fast_settings(bare_servers)
    broker, policy = create_broker(bare_roles.settings("dataset-validator", settings), "dataset-validator")
    durable = f"crashing-{uuid.uuid4().hex[:8]}"
    policy.durables.add(durable)
    watch = await policy.watch_max_deliveries(await broker.connect())
    nc = await connect(settings)  # the admin plays the crashing worker
    subject = f"tunebus.v1.training.crash-{uuid.uuid4().hex[:8]}"
    msg_id = f"crash-{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream()
        crashing = await js.pull_subscribe(subject, durable=durable, stream=subjects.EVENTS_STREAM,
                                           config=ConsumerConfig(ack_wait=0.5, max_deliver=1))
        await js.publish(subject, b'{"a": "body"}', headers={"Nats-Msg-Id": msg_id})
        assert len(await crashing.fetch(1, timeout=5)) == 1  # ... and never acknowledged
        letters = await wait_until_dead_lettered_by_msg_id(settings, {msg_id})
    finally:
        await watch.unsubscribe()
        await broker.stop()
        await nc.close()
    assert "JetStream stopped delivering it after 1 attempts" in letters[msg_id]["reason"]
    assert letters[msg_id]["service"] == "dataset-validator"
    assert base64.b64decode(letters[msg_id]["body_base64"]) == b'{"a": "body"}'
    assert letters[msg_id]["original_subject"] == subject


async def wait_until_dead_lettered_by_msg_id(settings, msg_ids: set[str], timeout: float = 20.0) -> dict:
    """The dead letters whose original carried these Nats-Msg-Ids, once all of them are there."""
    nc = await connect(settings)
    found: dict[str, dict] = {}
    try:
        sub = await nc.jetstream().subscribe(f"{subjects.DEAD_LETTER}.>", ordered_consumer=True)
        deadline = asyncio.get_running_loop().time() + timeout
        while not msg_ids <= found.keys():
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"not dead-lettered: {sorted(msg_ids - found.keys())}"
            try:
                msg = await sub.next_msg(timeout=min(left, 1.0))
            except nats.errors.TimeoutError:
                continue
            letter = json.loads(msg.data)["data"]
            if (msg_id := letter["headers"].get("Nats-Msg-Id")) in msg_ids:
                found[msg_id] = letter
    finally:
        await nc.close()
    return found


async def test_a_consumer_created_with_unbounded_deliveries_gets_the_bound(bare_servers):
    from tunebus.shared.bus import bound_deliveries

    settings = fast_settings(bare_servers, max_deliveries=3)
    nc = await connect(settings)
    durable = f"old-{uuid.uuid4().hex[:8]}"
    try:
        await ensure_streams(nc)
        js = nc.jetstream()
        await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
            durable_name=durable, filter_subject=SUBJECT, max_deliver=-1, ack_wait=5))
        await bound_deliveries(nc, {durable, "never-created"}, 4)
        info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert (info.config.max_deliver, info.config.ack_wait) == (4, 5)
    finally:
        await nc.close()
