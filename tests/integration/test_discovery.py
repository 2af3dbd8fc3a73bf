"""Every service answers NATS service discovery (the micro protocol) and a status request."""

from __future__ import annotations

import json

import nats
import pytest

from tests.helpers.bus import connect


pytestmark = pytest.mark.anyio
SERVICES = {"dataset-validator", "trainer", "evaluator", "adapter-registry"}


async def test_every_service_answers_ping_and_info(stack):
    nc = await connect(stack.settings)
    try:
        replies = []
        inbox = nc.new_inbox()
        async def collect(msg):
            replies.append(json.loads(msg.data))

        sub = await nc.subscribe(inbox, cb=collect)

        async def pinged_all():
            await nc.publish("$SRV.PING", b"", reply=inbox)
            return {r["name"] for r in replies} >= SERVICES

        await wait_until_async(pinged_all, 30)
        await sub.unsubscribe()

        info = json.loads((await nc.request("$SRV.INFO.trainer", b"", timeout=5)).data)
        assert info["metadata"]["backend"] == "mlx"
        assert "sft" in json.loads(info["metadata"]["capabilities"])["methods"]

        status = json.loads((await nc.request("tunebus.v1.status.evaluator", b"", timeout=5)).data)
        assert status["service"] == "evaluator" and status["active_jobs"] == []
    finally:
        await nc.close()


async def wait_until_async(check, timeout):
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.3)
    raise AssertionError("not every service answered $SRV.PING")


