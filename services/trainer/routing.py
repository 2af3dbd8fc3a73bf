"""Which trainers are running, and what each can do: NATS service discovery ($SRV.INFO).

Every trainer announces `backend` and `capabilities` (a TrainerCapabilities, as JSON) in its
service metadata (shared/service.py), so one request to $SRV.INFO.trainer, answered by every
running instance, tells a worker who else could take a request it cannot run itself.
"""

from __future__ import annotations

import asyncio
import json

import nats
import structlog
from tunebus.contracts.training import TrainerCapabilities

log = structlog.get_logger()


async def running_trainers(nc: nats.NATS, service: str, timeout: float) -> list[TrainerCapabilities]:
    """The capabilities of every instance of `service` that answers within `timeout` seconds."""
    answers: list[bytes] = []

    async def collect(msg) -> None:
        answers.append(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$SRV.INFO.{service}", b"", reply=inbox)
        await asyncio.sleep(timeout)  # a collection window: answers arrive from every instance
    finally:
        await sub.unsubscribe()
    found = []
    for answer in answers:
        try:
            metadata = json.loads(answer)["metadata"]
            found.append(TrainerCapabilities.model_validate_json(metadata["capabilities"]))
        except (ValueError, KeyError) as e:
            log.warning("ignoring a discovery answer without capabilities", error=str(e))
    return found
