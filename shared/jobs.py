"""Idempotency on job_id: each stage of a job runs for one triggering event only.

A claim is a key in the JetStream key-value bucket `tunebus-jobs`, created atomically: the first
event to claim `<stage>.<job_id>` owns that stage. The same event, redelivered after a crash,
finds its own claim and carries on; any other event (a second TrainingRequested with the same
job_id) finds someone else's and is dropped. A finished stage is marked done, so not even a
late redelivery of the owning event runs it twice.
"""

from __future__ import annotations

import json
from enum import Enum

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tunebus.contracts.subjects import JOBS_BUCKET as BUCKET


class Claim(Enum):
    NEW = "new"  # this event is the first: run the stage
    RESUME = "resume"  # this event claimed it before and did not finish: run it again
    DUPLICATE = "duplicate"  # another event owns the stage, or it is done: skip


class JobClaims:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def claim(self, stage: str, job_id: str, event_id: str) -> Claim:
        key = f"{stage}.{job_id}"
        try:
            await self.kv.create(key, json.dumps({"event_id": event_id, "done": False}).encode())
            return Claim.NEW
        except KeyWrongLastSequenceError:
            held = json.loads((await self.kv.get(key)).value)
        if held["event_id"] == event_id and not held["done"]:
            return Claim.RESUME
        return Claim.DUPLICATE

    async def finish(self, stage: str, job_id: str, event_id: str) -> None:
        await self.kv.put(
            f"{stage}.{job_id}", json.dumps({"event_id": event_id, "done": True}).encode()
        )
