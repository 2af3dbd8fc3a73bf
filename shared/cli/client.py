"""A small client of the bus for people and scripts: submit a job, follow it, ask the registry.

Plain nats-py: a client needs no FastStream app and no durable consumer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from weakref import WeakKeyDictionary

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.errors import NoServersError
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import BaseModel

from tunebus.contracts import (
    DeadLetter,
    DeadLetterEvent,
    ReplayDeadLetter,
    ReplayReply,
    Envelope,
    Generate,
    Generation,
    GenerationChunk,
    TrainingRefusedEvent,
    TrainingRequested,
    TrainingRequestedEvent,
    subjects,
)
from tunebus.contracts.catalog import event_for_subject

from tunebus.shared.bus import nats_options
from tunebus.shared.settings import Settings

R = TypeVar("R", bound=BaseModel)

# The events after which nothing more happens to a job.
FINAL_TYPES = {
    "tunebus.dataset.rejected.v1",
    "tunebus.training.failed.v1",
    "tunebus.training.cancelled.v1",
    "tunebus.adapter.registered.v1",
    "tunebus.deadletter.v1",
}


class PermissionDenied(Exception):
    """The NATS server refused this identity, or refused it a subject."""


# The permission errors the server sent on each open connection (nats-py reports them
# asynchronously; the call that caused one only sees a timeout).
_denials: WeakKeyDictionary[nats.NATS, list[str]] = WeakKeyDictionary()


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[nats.NATS]:
    nc = await open_connection(settings)
    try:
        yield nc
    finally:
        await nc.drain()


async def open_connection(settings: Settings) -> nats.NATS:
    """A connection as the identity of `settings` that remembers what the server refused it;
    PermissionDenied when the server refuses the identity itself."""
    denials: list[str] = []

    async def on_error(error: Exception) -> None:
        if "violation" in str(error).lower():
            denials.append(str(error))

    try:
        nc = await nats.connect(**nats_options(settings), name="tunebus-cli", connect_timeout=5,
                                max_reconnect_attempts=3, error_cb=on_error)
    except (NoServersError, nats.errors.Error) as e:
        if denials or "authorization violation" in str(e).lower():
            raise PermissionDenied(
                f"the NATS server at {settings.nats_url} refused this identity "
                f"({settings.nats.user or 'anonymous'}): set TUNEBUS_NATS__USER and "
                "TUNEBUS_NATS__PASSWORD (or TUNEBUS_NATS__CREDS_FILE)") from None
        raise
    _denials[nc] = denials
    return nc


async def _unless_refused(nc: nats.NATS, subject: str, awaitable):
    """Await `awaitable` (a request to `subject`), but raise PermissionDenied as soon as the
    server says this identity may not publish there, instead of waiting out the timeout."""
    task = asyncio.ensure_future(awaitable)
    denials = _denials.get(nc)
    while denials is not None and not task.done():
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and any(f'"{subject.lower()}"' in d.lower() for d in denials):
            task.cancel()
            raise _refused(nc, subject, TimeoutError())
    return await task


def _refused(nc: nats.NATS, subject: str, error: Exception) -> Exception:
    """What a timed-out call to `subject` really was, if the server refused it."""
    denials = _denials.get(nc) or []
    if any(f'"{subject.lower()}"' in denial.lower() for denial in denials):
        user = nc.options.get("user") or "this identity"
        return PermissionDenied(f"{user} may not publish to {subject} (the server refused it)")
    return error


async def submit(nc: nats.NATS, request: TrainingRequested) -> TrainingRequestedEvent:
    event = TrainingRequestedEvent.wrap(request, source="tunebus/cli")
    try:
        await nc.jetstream().publish(
            subjects.TRAINING_REQUESTED,
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": event.id, "content-type": "application/json",
                     "ce-type": event.type, "ce-subject": event.subject},
        )
    except nats.errors.TimeoutError as e:
        raise _refused(nc, subjects.TRAINING_REQUESTED, e) from None
    except NoStreamResponseError:
        raise NoStreamResponseError(
            description=f"no JetStream stream stores {subjects.TRAINING_REQUESTED}: "
            "are the tunebus services running against this NATS?"
        ) from None
    return event


async def follow(nc: nats.NATS, job_id: str, *, until_final: bool = True,
                 answering: str | None = None) -> AsyncIterator[Envelope]:
    """Every event of `job_id`, oldest first per stream, including its dead letters; stops after
    a final one. With `answering` (the id of a request just submitted), the job's events from
    before that request are left out, and its refusal (the job_id was taken) is final too."""
    js = nc.jetstream()
    inbox: asyncio.Queue = asyncio.Queue()

    async def collect(msg) -> None:
        await inbox.put(msg)

    subs = [
        await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                           deliver_policy=DeliverPolicy.ALL, cb=collect)
        for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM)
    ]
    seen_request = False
    try:
        while True:
            msg = await inbox.get()
            try:
                event = event_for_subject(msg.subject).model_validate_json(msg.data)
            except (KeyError, ValueError):
                continue
            if event.subject != job_id:
                continue
            if answering and not seen_request:
                dead_request = (isinstance(event, DeadLetterEvent)
                                and event.data.headers.get("Nats-Msg-Id") == answering)
                if event.id != answering and not dead_request:
                    continue  # the job_id's earlier life, before this request
                seen_request = True
            yield event
            refused = isinstance(event, TrainingRefusedEvent) and event.data.event_id == answering
            if until_final and (event.type in FINAL_TYPES or refused):
                return
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def replay(nc: nats.NATS, job_id: str | None = None) -> list[Envelope]:
    """Every event stored right now (of `job_id`, or of every job), dead letters included,
    oldest first. Unlike `follow` it returns once it has read what the streams held."""
    js = nc.jetstream()
    events: list[Envelope] = []
    for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM):
        try:
            last = (await js.stream_info(stream)).state.last_seq
        except NotFoundError:
            continue
        if not last:
            continue
        sub = await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                try:
                    event = event_for_subject(msg.subject).model_validate_json(msg.data)
                except (KeyError, ValueError):
                    event = None
                if event is not None and (job_id is None or event.subject == job_id):
                    events.append(event)
                if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    return sorted(events, key=lambda e: e.time)


async def discover(nc: nats.NATS, wait: float = 1.0) -> list[dict]:
    """Every running tunebus service instance, as its NATS service discovery STATS reply (name,
    id, version, metadata with backend and capabilities, started, endpoints) plus `active_jobs`.

    Discovery is a broadcast: replies are collected for `wait` seconds, as `nats micro ls` does."""
    replies: list[dict] = []

    async def collect(msg) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            pass

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish("$SRV.STATS", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    for reply in replies:
        data = [endpoint.get("data") or {} for endpoint in reply.get("endpoints") or []]
        reply["active_jobs"] = sorted({job for d in data for job in d.get("active_jobs") or []})
        # A stalled consumer makes the instance unhealthy (shared/health.py).
        reply["problems"] = sorted({p for d in data for p in d.get("problems") or []})
        reply["healthy"] = not reply["problems"]
    return sorted(replies, key=lambda r: (r.get("name", ""), r.get("id", "")))


async def ask(nc: nats.NATS, subject: str, query: BaseModel, reply: type[R], timeout: float = 10.0) -> R:
    """One request/reply round trip to a service."""
    try:
        msg = await _unless_refused(
            nc, subject, nc.request(subject, query.model_dump_json().encode(), timeout=timeout))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
        # The server's -ERR may arrive just after: it comes before the PONG of a flush.
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await asyncio.sleep(0.05)
        raise _refused(nc, subject, e) from None
    return reply.model_validate(json.loads(msg.data))


async def generate(nc: nats.NATS, request: Generate, on_text=None, *, timeout: float = 300.0) -> Generation:
    """Ask the evaluator for a generation. With `request.stream`, each piece of text is given
    to `on_text` as it arrives (the chunks come to an inbox of ours, the final reply last);
    `timeout` bounds the wait for each message."""
    body = request.model_dump_json(exclude_none=True).encode()
    if not request.stream:
        return await ask(nc, subjects.INFERENCE_GENERATE, request, Generation, timeout)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subjects.INFERENCE_GENERATE, body, reply=inbox)
        while True:
            try:
                msg = await _unless_refused(nc, subjects.INFERENCE_GENERATE, sub.next_msg(timeout=timeout))
            except nats.errors.TimeoutError as e:
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)
                await asyncio.sleep(0.05)
                raise _refused(nc, subjects.INFERENCE_GENERATE, e) from None
            data = json.loads(msg.data)
            if data.get("done"):
                return Generation.model_validate(data)
            if on_text is not None:
                await on_text(GenerationChunk.model_validate(data).text)
    finally:
        await sub.unsubscribe()


def run(coro):
    return asyncio.run(coro)


@dataclass(frozen=True)
class StoredDeadLetter:
    """A dead letter and where it lies: its sequence in TUNEBUS_DEADLETTER is its id."""

    sequence: int
    event: DeadLetterEvent

    @property
    def letter(self) -> DeadLetter:
        return self.event.data


async def dead_letters(nc: nats.NATS) -> list[StoredDeadLetter]:
    """Every dead letter the stream holds, oldest first (one that is not a dead letter is left
    out: only services publish there)."""
    found: list[StoredDeadLetter] = []
    for msg in await _read_stream(nc, subjects.DEAD_LETTER_STREAM):
        try:
            found.append(StoredDeadLetter(msg.metadata.sequence.stream,
                                          DeadLetterEvent.model_validate_json(msg.data)))
        except ValueError:
            continue
    return found


async def dead_letter(nc: nats.NATS, sequence: int) -> StoredDeadLetter | None:
    msg = await read_at(nc, subjects.DEAD_LETTER_STREAM, sequence)
    if msg is None:
        return None
    try:
        return StoredDeadLetter(sequence, DeadLetterEvent.model_validate_json(msg.data))
    except ValueError:
        return None


async def read_at(nc: nats.NATS, stream: str, sequence: int):
    """The message at `sequence` of `stream`, read through an ordered consumer (what client
    roles may create; they may not get messages by sequence), or None when it is gone."""
    js = nc.jetstream()
    try:
        last = (await js.stream_info(stream)).state.last_seq
    except NotFoundError:
        return None
    if sequence > last or sequence < 1:
        return None
    sub = await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                                   opt_start_seq=sequence))
    try:
        msg = await sub.next_msg(timeout=10)
    except nats.errors.TimeoutError:
        return None
    finally:
        await sub.unsubscribe()
    return msg if msg.metadata.sequence.stream == sequence else None


async def _read_stream(nc: nats.NATS, stream: str) -> list:
    js = nc.jetstream()
    try:
        last = (await js.stream_info(stream)).state.last_seq
    except NotFoundError:
        return []
    if not last:
        return []
    messages = []
    sub = await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=10)
            except nats.errors.TimeoutError:
                break
            messages.append(msg)
            if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return messages


async def replay_dead_letter(nc: nats.NATS, sequence: int, reason: str = "") -> ReplayReply:
    """Publish dead letter `sequence` again on its original subject, as shared/replay.py says:
    a client's subject (training.requested) by this identity, a service's by that service."""
    from tunebus.shared.identities import publisher_of
    from tunebus.shared.replay import (
        NotReplayable, is_event_subject, original_body, replay_headers)

    stored = await dead_letter(nc, sequence)
    if stored is None:
        return ReplayReply(sequence=sequence, error=f"no dead letter at sequence {sequence} in "
                           f"{subjects.DEAD_LETTER_STREAM}")
    subject = stored.letter.original_subject
    if not is_event_subject(subject):
        return ReplayReply(sequence=sequence, error=f"{subject} is not an event subject; only "
                           f"messages of {subjects.EVENTS_STREAM} are replayed")
    if owner := publisher_of(subject):
        return await ask(nc, subjects.replay(owner), ReplayDeadLetter(sequence=sequence, reason=reason),
                         ReplayReply)

    async def read_event(seq: int) -> bytes | None:
        msg = await read_at(nc, subjects.EVENTS_STREAM, seq)
        return msg.data if msg is not None else None

    try:
        body = await original_body(stored.letter, read_event)
    except NotReplayable as e:
        return ReplayReply(sequence=sequence, error=str(e))
    try:
        ack = await nc.jetstream().publish(subject, body,
                                           headers=replay_headers(stored.letter, sequence))
    except nats.errors.TimeoutError as e:
        await asyncio.sleep(0.05)
        raise _refused(nc, subject, e) from None
    return ReplayReply(sequence=sequence, subject=subject, stream_sequence=ack.seq,
                       duplicate=bool(ack.duplicate))
