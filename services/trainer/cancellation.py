"""Cancelling a job: a durable fact in the job key-value bucket, not a message to one worker.

`tunebus.v1.trainer.cancel` is answered by one trainer (a queue group). It reads the job's
claims (`shared/jobs.py`) to tell a finished or unknown job from a live one and, for a live one,
writes `cancel.<job_id>`. The worker running the job watches that key and stops at its next
step; a job cancelled before its training began is cancelled as soon as a worker picks it up,
whichever worker that is, and after any restart.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from tunebus.contracts.training import CancelReply, CancelTraining
from tunebus.shared.jobs import Stage, cancel_key, claim_key


async def request_cancel(kv: KeyValue, command: CancelTraining) -> CancelReply:
    job_id = command.job_id
    training = await _read(kv, claim_key(Stage.TRAIN, job_id))
    if training is not None and training.get("done"):
        return CancelReply(job_id=job_id, status="finished",
                           message=f"the training of job {job_id} has already ended; nothing to cancel")
    if training is None and await _read(kv, claim_key(Stage.VALIDATE, job_id)) is None:
        return CancelReply(job_id=job_id, status="unknown",
                           message=f"no job {job_id} has reached the dataset validator or a trainer")
    await kv.put(cancel_key(job_id), json.dumps(
        {"reason": command.reason, "requested_at": datetime.now(UTC).isoformat()}).encode())
    if training is not None:
        message = f"job {job_id} is training: it stops at its next step and keeps its last checkpoint"
    else:
        message = f"job {job_id} has not started training: it is cancelled before it does"
    return CancelReply(job_id=job_id, status="cancelling", message=message)


async def cancel_reason(kv: KeyValue, job_id: str) -> str | None:
    """Why the job was cancelled, or None when it was not."""
    record = await _read(kv, cancel_key(job_id))
    return None if record is None else record.get("reason") or "cancelled by request"


class CancelWatch:
    """While open, sets `reason` (read from any thread) as soon as the job is cancelled."""

    def __init__(self, kv: KeyValue, job_id: str) -> None:
        self.kv = kv
        self.job_id = job_id
        self.reason: str | None = None
        self._seen = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._seen.is_set()

    async def __aenter__(self) -> CancelWatch:
        self._watcher = await self.kv.watch(cancel_key(self.job_id))
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await self._watcher.stop()

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is not None and entry.value:  # None marks "no more history"
                self.reason = json.loads(entry.value).get("reason") or "cancelled by request"
                self._seen.set()


async def _read(kv: KeyValue, key: str) -> dict | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return json.loads(entry.value) if entry.value else None
