"""Job-keyed reads: the latest event of each kind of every job, in a key-value bucket.

v1 subjects carry no job id, so reading one job's events from TUNEBUS_EVENTS means reading every
job's (30 days of progress events in a busy deployment). So every service also keeps, beside the
stream, the events it publishes, one per job and kind:

    <job_id>.<kind>    the latest event of that kind (`training.progress`, `adapter.registered`,
                       `deadletter.<service>`), as published; `training.requested` is the first
                       request the validator consumed (created once: a refused duplicate does
                       not replace it)

in the bucket `tunebus-job-events` (history 1, kept as long as the stream keeps events). A job's
status is then a dozen key reads whatever the stream holds, and the list of jobs one ordered
consumer over the bucket's latest values, in proportion to the number of jobs.

The stream stays the record: writes here are best effort (one that fails is logged, never fails
the work), `tunebus status --replay` folds the stream as before, and a job the bucket does not
know is read from the stream. A service whose identity may not write here (an older permission
set) records nothing, saying so once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from faststream import BaseMiddleware
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from tunebus.contracts import Envelope, subjects
from tunebus.contracts.catalog import EVENTS
from tunebus.contracts.deadletter import DeadLetterEvent

BUCKET = subjects.JOB_EVENTS_BUCKET
STREAM = f"KV_{BUCKET}"
TTL_S = 30 * 24 * 3600  # as long as TUNEBUS_EVENTS keeps events
SERVICES = ("dataset-validator", "trainer", "evaluator", "adapter-registry")
BY_TYPE: dict[str, type[Envelope]] = {e.event_type(): e for e in [*EVENTS.values(), DeadLetterEvent]}
FIRST_ONLY = {"training.requested"}  # the job's own request; a later one under its id is refused
# Every key a job can have, without listing the bucket.
KINDS = tuple(sorted({_t.removeprefix("tunebus.").removesuffix(".v1") for _t in BY_TYPE} - {"deadletter"}
                     | {f"deadletter.{s}" for s in SERVICES}))
BIND_TIMEOUT_S = 2.0
WRITE_TIMEOUT_S = 2.0
PAUSE_AFTER_FAILURE_S = 60.0

log = structlog.get_logger()


def kind_of(doc: dict[str, Any]) -> str | None:
    """The key suffix of an event document, None when it is not a tunebus event."""
    kind = str(doc.get("type", "")).removeprefix("tunebus.").removesuffix(".v1")
    if f"tunebus.{kind}.v1" not in BY_TYPE:
        return None
    if kind == "deadletter":
        return f"deadletter.{(doc.get('data') or {}).get('service', 'unknown')}"
    return kind


class JobEvents:
    """The bucket, read and written."""

    def __init__(self, js: Any, kv: Any) -> None:
        self.js, self.kv = js, kv

    @classmethod
    async def bind(cls, js: Any, timeout: float = BIND_TIMEOUT_S) -> JobEvents | None:
        """The bucket when it exists and this identity may read it; None otherwise."""
        try:
            return cls(js, await asyncio.wait_for(js.key_value(BUCKET), timeout))
        except Exception:  # noqa: BLE001 - not declared, not allowed, or no JetStream: no index
            return None

    async def record(self, body: bytes) -> None:
        """Keep an event (its JSON, as published) under its job and kind."""
        doc = json.loads(body)
        kind, job_id = kind_of(doc), doc.get("subject")
        if kind is None or not job_id or job_id == "unknown":
            return
        key = f"{job_id}.{kind}"
        if kind in FIRST_ONLY:
            try:
                await self.kv.create(key, body)
            except KeyWrongLastSequenceError:
                pass
            return
        await self.kv.put(key, body)

    async def of_job(self, job_id: str) -> list[Envelope]:
        """The job's latest event of each kind, oldest first: one read per kind, however many
        events the stream holds."""
        async def get(kind: str) -> bytes | None:
            try:
                return (await self.kv.get(f"{job_id}.{kind}")).value
            except KeyNotFoundError:
                return None

        found = await asyncio.gather(*[get(kind) for kind in KINDS])
        return sorted((e for e in map(_parsed, found) if e is not None), key=lambda e: e.time)

    async def all_jobs(self) -> dict[str, list[Envelope]]:
        """Every job's latest events, oldest first per job: one ordered consumer over the
        bucket's current values (in proportion to the jobs, not to the events)."""
        try:
            if not (await self.js.stream_info(STREAM)).state.messages:
                return {}
        except NotFoundError:
            return {}
        sub = await self.js.subscribe(f"$KV.{BUCKET}.>", stream=STREAM, ordered_consumer=True,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT))
        jobs: dict[str, list[Envelope]] = {}
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                operation = (msg.headers or {}).get("KV-Operation")
                if operation not in ("DEL", "PURGE") and (event := _parsed(msg.data)) is not None:
                    jobs.setdefault(event.subject, []).append(event)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return {job: sorted(events, key=lambda e: e.time) for job, events in jobs.items()}


def _parsed(body: bytes | None) -> Envelope | None:
    if not body:
        return None
    try:
        doc = json.loads(body)
        return BY_TYPE[doc["type"]].model_validate(doc)
    except (KeyError, ValueError, TypeError):
        return None


class JobEventsRecorder:
    """A broker middleware factory: whatever event the service publishes (and every training
    request it consumes) is kept in the bucket once `bind` found it writable."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.index: JobEvents | None = None
        self.paused_until = 0.0

    async def bind(self, nc: Any) -> None:
        self.index = await JobEvents.bind(nc.jetstream())
        if self.index is None:
            log.warning("job events not recorded: the bucket is missing or this identity may "
                        "not use it (job status is then read from the stream)", bucket=BUCKET)

    def __call__(self, msg: Any, /, *, context: Any) -> _Recording:
        return _Recording(msg, context=context, recorder=self)

    async def record(self, body: Any) -> None:
        if self.index is None or not isinstance(body, bytes | bytearray):
            return
        if time.monotonic() < self.paused_until:
            return
        try:
            await asyncio.wait_for(self.index.record(bytes(body)), WRITE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - best effort: the stream is the record
            # A write refused or timed out: pause, so that the service's own publishes never
            # wait on the bucket again and again (a progress event every few steps).
            self.paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            log.warning("job events not recorded for a while", error=f"{type(e).__name__}: {e}",
                        pause_s=PAUSE_AFTER_FAILURE_S)


class _Recording(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, recorder: JobEventsRecorder) -> None:
        super().__init__(msg, context=context)
        self.recorder = recorder

    async def publish_scope(self, call_next, cmd):
        result = await call_next(cmd)
        if _is_event_subject(getattr(cmd, "destination", "")):
            await self.recorder.record(cmd.body)
        return result

    async def consume_scope(self, call_next, msg):
        raw = getattr(msg, "raw_message", None)
        if getattr(raw, "subject", None) == subjects.TRAINING_REQUESTED:
            await self.recorder.record(raw.data)
        return await call_next(msg)


def _is_event_subject(subject: str) -> bool:
    return subject in EVENTS or subject.startswith(subjects.DEAD_LETTER + ".")
