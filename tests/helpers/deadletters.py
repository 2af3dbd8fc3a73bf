"""Poison for the dead-letter tests: a message a service must refuse, and its dead letter."""

from __future__ import annotations

import asyncio
import json
import uuid

from tunebus.shared.cli import client
from tunebus.shared.replay import REPLAY_HEADER

from .bus import connect


def envelope_without_specversion(job_id: str, event_type: str) -> bytes:
    """An event that says which job it is of but is no CloudEvent: poison at first sight."""
    return json.dumps({"id": str(uuid.uuid4()), "source": "tests/deadletters", "type": event_type,
                       "subject": job_id, "data": {"job_id": job_id}}).encode()


async def poison(settings, subject: str, body: bytes, job_id: str) -> client.StoredDeadLetter:
    nc = await connect(settings)
    try:
        await nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": str(uuid.uuid4())})
    finally:
        await nc.drain()
    return await dead_letter_of(settings, job_id)


async def dead_letter_of(settings, job_id: str, replay_of: int | None = None) -> client.StoredDeadLetter:
    """The job's dead letter (of the replay of dead letter `replay_of`), once it is there."""
    nc = await connect(settings)
    try:
        found: list = []

        async def arrived():
            found[:] = [d for d in await client.dead_letters(nc) if d.letter.job_id == job_id
                        and d.letter.headers.get(REPLAY_HEADER) == (str(replay_of) if replay_of else None)]
            return found

        deadline = asyncio.get_running_loop().time() + 30
        while not await arrived():
            assert asyncio.get_running_loop().time() < deadline, f"no dead letter for {job_id}"
            await asyncio.sleep(0.2)
        return found[0]
    finally:
        await nc.drain()
