"""Reading what the services said: the events and dead letters stored in the streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import nats

from tunebus.contracts import subjects

from .bus import connect


class StoredEvents:
    """Every message of the events and dead-letter streams, read from the start, in the order
    each stream holds them (ordered consumers: nothing is missed while a test waits)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict]] = []

    async def start(self, settings) -> StoredEvents:
        self.nc = await connect(settings)
        js = self.nc.jetstream(timeout=30)  # a loaded machine or a fresh cluster answers slowly

        async def record(msg) -> None:
            try:
                self.messages.append((msg.subject, json.loads(msg.data)))
            except Exception:  # poison: not JSON, not UTF-8, nested too deeply
                self.messages.append((msg.subject, {}))

        self.subs = [await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, cb=record,
                                        ordered_consumer=True)
                     for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM)]
        return self

    async def close(self) -> None:
        await self.nc.close()

    def of(self, job_id: str, suffix: str) -> list[dict]:
        return [body for subject, body in self.messages
                if subject.endswith(suffix) and body.get("subject") == job_id]

    async def wait_for(self, job_id: str, suffix: str, timeout: float = 60.0, count: int = 1) -> list[dict]:
        """The job's events on `suffix`, once there are `count` of them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found := self.of(job_id, suffix)) < count:
            if asyncio.get_running_loop().time() > deadline:
                seen = sorted({s for s, b in self.messages if b.get("subject") == job_id})
                raise AssertionError(f"{count} {suffix} event(s) of {job_id} not seen within "
                                     f"{timeout:.0f}s; its events: {seen}")
            await asyncio.sleep(0.1)
        return found


async def publish_raw(nc: nats.NATS, subject: str, body: bytes, msg_id: str | None = None) -> int:
    """Publish through JetStream as an external system would; the stream sequence."""
    ack = await nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
    return ack.seq


class EventLog:
    """Everything published under tunebus.v1.> while it listens, as (subject, decoded JSON)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict]] = []

    async def start(self, nc: nats.NATS) -> EventLog:
        async def record(msg):
            try:
                self.messages.append((msg.subject, json.loads(msg.data)))
            except ValueError:
                self.messages.append((msg.subject, {"raw": msg.data.decode(errors="replace")}))

        # The event and dead-letter subjects (what an observer may read), not request/reply traffic.
        self.subs = [await nc.subscribe(subject, cb=record)
                     for subject in (*subjects.EVENTS_STREAM_SUBJECTS, *subjects.DEAD_LETTER_STREAM_SUBJECTS)]
        return self

    def of_job(self, job_id: str, subject_suffix: str) -> list[dict]:
        return [
            body for subject, body in self.messages
            if subject.endswith(subject_suffix) and body.get("subject") == job_id
        ]

    async def wait_for(self, job_id: str, subject_suffix: str, timeout: float = 120.0) -> dict:
        """The first such event of the job; fails at once if the job ends some other way."""

        def arrived_or_ended():
            if found := self.of_job(job_id, subject_suffix):
                return found
            for end in self.ENDINGS:
                if end != subject_suffix and (ended := self.of_job(job_id, end)):
                    raise AssertionError(f"job {job_id} ended with {end}: {ended[0]['data']}")
            return None

        await wait_until(arrived_or_ended, timeout, f"no {subject_suffix} event for job {job_id}")
        return self.of_job(job_id, subject_suffix)[0]

    ENDINGS = (".dataset.rejected", ".training.failed", ".evaluation.failed",
               ".deadletter.dataset-validator", ".deadletter.trainer", ".deadletter.evaluator",
               ".deadletter.adapter-registry")


async def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


async def consumer_idle(nc: nats.NATS, durable: str, stream: str = "TUNEBUS_EVENTS") -> bool:
    """True when the durable consumer has nothing pending and nothing awaiting an ack."""
    info = await nc.jetstream().consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0
