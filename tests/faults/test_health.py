"""A service whose consumer stalls says so over service discovery ($SRV.STATS), as `tunebus
health` reads it, and recovers its health when the consumer moves again."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from tunebus.contracts import TrainingFailed, TrainingFailedEvent, subjects
from tunebus.shared.bus import consume, publish, publishes
from tunebus.shared.cli.client import discover
from tunebus.shared.identities import Credentials
from tunebus.shared.devstack.stack import start_nats
from tunebus.shared.service import create_service
from tunebus.shared.settings import DeliverySettings, NatsAuth, Settings

from tests.helpers.bus import connect

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path):
    passwords = Credentials.generate().passwords
    server, url = start_nats(tmp_path / "jetstream", passwords)
    # A service of its own, so it runs as the admin (no role lists its subjects).
    yield Settings(nats_url=url, nats=NatsAuth(user="admin", password=passwords["admin"]),
                   work_dir=tmp_path / "work",
                   delivery=DeliverySettings(stall_after_s=1.0, ack_wait_s=5, heartbeat_s=1))
    server.stop()


async def instance_of(nc, name: str, healthy: bool, timeout: float = 20.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [i for i in await discover(nc, wait=0.3) if i["name"] == name]
        if found and found[0]["healthy"] is healthy:
            return found[0]
        assert asyncio.get_running_loop().time() < deadline, f"{name} never healthy={healthy}: {found}"


async def test_a_consumer_that_stops_pulling_with_a_backlog_makes_its_instance_unhealthy(settings):
    name = f"stall-{uuid.uuid4().hex[:6]}"
    service = create_service(name, settings)
    handled = []

    subscriber = consume(service.broker, subjects.TRAINING_FAILED, durable=name, settings=settings)

    @subscriber
    async def on_failed(event: TrainingFailedEvent) -> None:
        handled.append(event.id)

    to_failed = publishes(service.broker, TrainingFailedEvent, subjects.TRAINING_FAILED)
    await service.app.start()
    nc = await connect(settings)
    try:
        await instance_of(nc, name, healthy=True)
        await subscriber.stop()  # the pull loop dies; the process lives on
        for n in range(3):
            await publish(to_failed, TrainingFailedEvent.wrap(
                TrainingFailed(job_id=f"job-{n}", reason="x"), source="tests"))
        stalled = await instance_of(nc, name, healthy=False)
        assert stalled["problems"] == [f"consumer {name}: 3 messages waiting and none delivered "
                                       f"for {stalled['problems'][0].split('for ')[1]}"]
        await subscriber.start()
        await instance_of(nc, name, healthy=True)
        assert len(handled) == 3
    finally:
        await nc.close()
        await service.app.stop()
