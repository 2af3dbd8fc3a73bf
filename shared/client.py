"""A small client of the bus for people and scripts: submit a job, follow it, ask the registry.

Plain nats-py: a client needs no FastStream app and no durable consumer of its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import nats
from nats.js.api import DeliverPolicy
from nats.js.errors import NoStreamResponseError
from pydantic import BaseModel

from tunebus.contracts import Envelope, TrainingRequested, TrainingRequestedEvent, subjects
from tunebus.contracts.catalog import event_for_subject

from .settings import Settings

R = TypeVar("R", bound=BaseModel)

# The events after which nothing more happens to a job.
FINAL_TYPES = {
    "tunebus.dataset.rejected.v1",
    "tunebus.training.failed.v1",
    "tunebus.training.cancelled.v1",
    "tunebus.adapter.registered.v1",
    "tunebus.deadletter.v1",
}


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(settings.nats_url, name="tunebus-cli", connect_timeout=5, max_reconnect_attempts=3)
    try:
        yield nc
    finally:
        await nc.drain()


async def submit(nc: nats.NATS, request: TrainingRequested) -> TrainingRequestedEvent:
    event = TrainingRequestedEvent.wrap(request, source="tunebus/cli")
    try:
        await nc.jetstream().publish(
            subjects.TRAINING_REQUESTED,
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": event.id, "content-type": "application/json",
                     "ce-type": event.type, "ce-subject": event.subject},
        )
    except NoStreamResponseError:
        raise NoStreamResponseError(
            description=f"no JetStream stream stores {subjects.TRAINING_REQUESTED}: "
            "are the tunebus services running against this NATS?"
        ) from None
    return event


async def follow(nc: nats.NATS, job_id: str, *, until_final: bool = True) -> AsyncIterator[Envelope]:
    """Every event of `job_id`, oldest first per stream, including its dead letters; stops after
    a final one."""
    js = nc.jetstream()
    inbox: asyncio.Queue = asyncio.Queue()

    async def collect(msg) -> None:
        await inbox.put(msg)

    subs = [
        await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                           deliver_policy=DeliverPolicy.ALL, cb=collect)
        for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM)
    ]
    try:
        while True:
            msg = await inbox.get()
            try:
                event = event_for_subject(msg.subject).model_validate_json(msg.data)
            except (KeyError, ValueError):
                continue
            if event.subject != job_id:
                continue
            yield event
            if until_final and event.type in FINAL_TYPES:
                return
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def ask(nc: nats.NATS, subject: str, query: BaseModel, reply: type[R], timeout: float = 10.0) -> R:
    """One request/reply round trip to a service."""
    msg = await nc.request(subject, query.model_dump_json().encode(), timeout=timeout)
    return reply.model_validate(json.loads(msg.data))


def run(coro):
    return asyncio.run(coro)
