"""Idempotency on job_id: each stage of a job runs for one triggering event only.

A claim is a key in the JetStream key-value bucket `tunebus-jobs`, created atomically: the first
event to claim `<stage>.<job_id>` owns that stage. The same event, redelivered after a crash,
finds its own claim and carries on; any other event (a second TrainingRequested with the same
job_id) finds someone else's and runs nothing. A finished stage is marked done, so not even a
late redelivery of the owning event runs it twice.

A claim can record the digest of what it was made for (`content_digest` of the request): a
second event with the same job_id and the same content is a DUPLICATE, one with other content a
CONFLICT. The stage answers both (the validator says TrainingRefused), never only in a log.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum, StrEnum

from pydantic import BaseModel

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .bus import Bucket

from tunebus.contracts.subjects import JOBS_BUCKET as BUCKET


class Stage(StrEnum):
    """The stages of a job, each claimed by the service that runs it."""

    VALIDATE = "validate"
    TRAIN = "train"
    EVALUATE = "evaluate"


def claim_key(stage: Stage, job_id: str) -> str:
    """The jobs-bucket key of a stage's claim."""
    return f"{stage}.{job_id}"


CANCEL = "cancel"  # cancel.<job_id>: the job was cancelled (a trainer writes it on request)


def cancel_key(job_id: str) -> str:
    return f"{CANCEL}.{job_id}"


class Claim(Enum):
    NEW = "new"  # this event is the first: run the stage
    RESUME = "resume"  # this event claimed it before and did not finish: run it again
    DUPLICATE = "duplicate"  # another event owns the stage (same content), or it is done: skip
    CONFLICT = "conflict"  # another event with different content owns the job_id: refuse


class JobClaims:
    """The claims in the jobs bucket (opened when the service connects)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    @property
    def kv(self) -> KeyValue:
        return self.bucket.kv

    async def claim(self, stage: Stage, job_id: str, event_id: str, digest: str | None = None) -> Claim:
        key = claim_key(stage, job_id)
        record = {"event_id": event_id, "done": False, "digest": digest}
        try:
            await self.kv.create(key, json.dumps(record).encode())
            return Claim.NEW
        except KeyWrongLastSequenceError:
            held = await self.holder(stage, job_id)
        if held["event_id"] == event_id:
            return Claim.DUPLICATE if held["done"] else Claim.RESUME
        if digest and held.get("digest") and held["digest"] != digest:
            return Claim.CONFLICT
        return Claim.DUPLICATE

    async def holder(self, stage: Stage, job_id: str) -> dict:
        """The claim on a stage: the owning event's id, its digest, and whether it is done."""
        return json.loads((await self.kv.get(claim_key(stage, job_id))).value)

    async def finish(self, stage: Stage, job_id: str, event_id: str, digest: str | None = None) -> None:
        await self.kv.put(claim_key(stage, job_id), json.dumps(
            {"event_id": event_id, "done": True, "digest": digest}).encode())


def content_digest(payload: BaseModel) -> str:
    """sha256 of a payload's canonical JSON (defaults filled in, keys sorted): two requests that
    mean the same have the same digest however they were written."""
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
