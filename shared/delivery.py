"""What happens to a message a consumer could not finish: the delivery policy of every service.

FastStream's NATS default (REJECT_ON_ERROR) terminates a message on any exception, so one flaky
S3 call would lose a training request. tunebus decides instead:

- success                      -> ack.
- the body is not an event of its subject (any bytes: not UTF-8, not JSON, nested too deeply,
  an envelope without `specversion`, `id`, `type` or `source`, a payload that fails its schema)
                               -> terminate at once, and publish it to
                                  `tunebus.v1.deadletter.<service>` with the reason; the consumer
                                  goes on with the next message, so poison never fills the line.
- `PermanentError`             -> the same: retrying cannot help.
- any other exception          -> nak with an exponential delay, so JetStream redelivers it; after
                                  `max_deliveries` attempts it is dead-lettered like the above.
- the service shuts down       -> nak at once, so another worker takes the message over.

JetStream bounds deliveries too (`max_deliver`, one more than `max_deliveries`): a handler runs
at most `max_deliveries` times, and the server's last delivery is only ever dead-lettered, so a
message that kills its process on every attempt (out of memory, say) still ends as a dead
letter. Should even that fail, the server says so in a MAX_DELIVERIES advisory, kept in the
TUNEBUS_ADVISORIES stream, and `watch_max_deliveries` dead-letters the message from the stream.
A body too large to travel inside a dead letter is kept by reference: its stream sequence, size,
sha256 and first KiB (the stream holds the full bytes). A dead letter is stored and shown, so it
never carries a credential: the value of every field whose name looks like one (`CREDENTIAL`,
at any depth) is replaced by `REDACTED`, in the body, the headers and the error texts alike; size
and sha256 stay the original's, which tells a replay to read the original back from the stream.

While a handler runs, an in-progress ack goes out every `heartbeat_s`, so long work (training)
is not redelivered to a second worker while the first is still busy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

import structlog
from faststream.middlewares import BaseMiddleware
from pydantic import ValidationError

from tunebus.contracts import DeadLetter, DeadLetterEvent, subjects
from tunebus.contracts.catalog import event_for_subject
from tunebus.contracts.training import SECRET_FIELD

from .settings import DeliverySettings

if TYPE_CHECKING:
    from faststream.nats import NatsBroker
    from faststream.nats.message import NatsMessage

log = structlog.get_logger()

# A dead letter is one NATS message (1 MiB by default, base64 and envelope included): a body
# above this size goes by reference, with only its first PREVIEW_BYTES inline.
MAX_INLINE_BODY = 256 * 1024
PREVIEW_BYTES = 1024
# What a received event must say for itself; defaults are for events a service creates.
ENVELOPE_ATTRIBUTES = ("specversion", "id", "type", "source")
REDACTED = "<redacted>"
# What a request may not carry (SECRET_FIELD), and what a header may carry besides.
CREDENTIAL = re.compile(rf"{SECRET_FIELD.pattern}|authorization", re.IGNORECASE)


class PermanentError(Exception):
    """A failure that will happen again on every retry: dead-letter the message at once."""


class Interrupted(Exception):
    """The service is shutting down mid-work: hand the message back at once, not as a failure."""


class DeliveryPolicy:
    """A FastStream broker middleware factory; one per service."""

    def __init__(self, service: str, settings: DeliverySettings) -> None:
        self.service = service
        self.settings = settings
        self.broker: NatsBroker | None = None
        self.durables: set[str] = set()  # the consumers of this service (see bus.consume)
        self.in_flight = 0  # messages whose handler runs now

    def bind(self, broker: NatsBroker) -> None:
        self.broker = broker

    def __call__(self, msg: Any, /, *, context: Any) -> _Delivery:
        return _Delivery(msg, context=context, policy=self)

    def retry_delay(self, deliveries: int) -> float:
        s = self.settings
        return min(s.retry_base_delay_s * 2 ** max(deliveries - 1, 0), s.retry_max_delay_s)

    async def dead_letter(
        self, msg: NatsMessage, reason: str, errors: list[str], deliveries: int
    ) -> None:
        raw = msg.raw_message
        await self.dead_letter_body(raw.subject, raw.data, raw.headers, _stream_seq(raw), reason,
                                    errors, deliveries)

    async def dead_letter_body(self, subject: str, body: bytes, headers: dict | None,
                               stream_seq: int | None, reason: str, errors: list[str],
                               deliveries: int) -> None:
        inline = len(body) <= MAX_INLINE_BODY
        kept = redacted_body(body)
        dead = DeadLetter(
            job_id=_job_id_of(body),
            service=self.service,
            original_subject=subject,
            reason=reason[:1000],
            errors=[e[:500] for e in errors[:50]],
            deliveries=deliveries,
            headers={k: REDACTED if CREDENTIAL.search(k) else str(v)[:1000]
                     for k, v in list((headers or {}).items())[:50]},
            body_base64=base64.b64encode(kept if inline else kept[:PREVIEW_BYTES]).decode(),
            body_complete=inline,
            body_size=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            stream_sequence=stream_seq,
        )
        event = DeadLetterEvent.wrap(dead, source=f"tunebus/{self.service}")
        assert self.broker is not None
        await self.broker.publish(
            event.model_dump_json().encode(),
            subjects.dead_letter(self.service),
            headers={"Nats-Msg-Id": f"dlq:{subject}:{stream_seq}"},
            stream=subjects.DEAD_LETTER_STREAM,
        )
        log.error("dead-lettered", reason=dead.reason, subject=subject, errors=dead.errors[:5],
                  stream_seq=stream_seq, size=len(body))

    async def watch_max_deliveries(self, nc: Any) -> Any:
        """Dead-letter every message of this service's consumers that JetStream stopped
        delivering (`max_deliver` reached unacknowledged). The advisories are kept in a stream
        and read by a durable consumer per service, so one raised while no instance ran is
        handled when one starts."""
        js = nc.jetstream()

        async def on_advisory(advisory: Any) -> None:
            try:
                note = json.loads(advisory.data)
                if note.get("consumer") in self.durables:
                    stored = await js.get_msg(note["stream"], note["stream_seq"])
                    await self.dead_letter_body(
                        stored.subject, stored.data or b"", stored.headers, stored.seq,
                        f"JetStream stopped delivering it after {note.get('deliveries')} attempts "
                        f"to {note['consumer']}: its handler never finished", [],
                        note.get("deliveries", 0))
            except Exception:
                log.exception("could not dead-letter a message JetStream gave up on; will retry",
                              advisory=advisory.data[:500])
                await advisory.nak(delay=self.retry_delay(advisory.metadata.num_delivered))
                return
            await advisory.ack()

        name = f"{self.service}-advisories"
        return await js.subscribe(f"{subjects.MAX_DELIVERIES_ADVISORY}.*", queue=name, durable=name,
                                  stream=subjects.ADVISORY_STREAM, cb=on_advisory, manual_ack=True)


class _Delivery(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, policy: DeliveryPolicy) -> None:
        super().__init__(msg, context=context)
        self.policy = policy

    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:
        raw = msg.raw_message
        if not (raw.reply or "").startswith("$JS.ACK."):
            return await call_next(msg)  # core NATS request/reply: nothing to acknowledge

        policy = self.policy
        deliveries = raw.metadata.num_delivered
        structlog.contextvars.bind_contextvars(
            job_id=_job_id_of(raw.data), event_id=(raw.headers or {}).get("Nats-Msg-Id")
        )
        try:
            if unfit := inbound_problems(raw.subject, raw.data):
                return await self._end(msg, *unfit, deliveries)
            if deliveries > policy.settings.max_deliveries:
                return await self._end(msg, "too many delivery attempts", [], deliveries)

            heartbeat = asyncio.create_task(self._heartbeat(msg))
            policy.in_flight += 1
            try:
                result = await call_next(msg)
            except PermanentError as e:
                return await self._end(msg, str(e), [repr(e)], deliveries)
            except Interrupted:
                log.info("interrupted by shutdown; handing the message back")
                await msg.nack()
                return None
            except asyncio.CancelledError:
                await msg.nack()
                raise
            except Exception as e:
                if deliveries >= policy.settings.max_deliveries:
                    log.exception("giving up", deliveries=deliveries)
                    return await self._end(msg, f"failed {deliveries} times: {e}", [repr(e)],
                                           deliveries)
                delay = policy.retry_delay(deliveries)
                log.warning("will retry", error=repr(e), deliveries=deliveries, delay_s=delay)
                await msg.nack(delay=delay)
                return None
            finally:
                heartbeat.cancel()
                policy.in_flight -= 1
            await msg.ack()
            return result
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "event_id")

    async def _end(self, msg: NatsMessage, reason: str, errors: list[str], deliveries: int) -> None:
        """Dead-letter the message and terminate it; if the dead letter cannot be stored, hand
        the message back instead, so that it is not lost."""
        try:
            await self.policy.dead_letter(msg, reason, errors, deliveries)
        except Exception as e:
            delay = self.policy.retry_delay(deliveries)
            log.error("could not dead-letter; will retry", error=repr(e), delay_s=delay)
            await msg.nack(delay=delay)
            return None
        await msg.reject()
        return None

    async def _heartbeat(self, msg: NatsMessage) -> None:
        while True:
            await asyncio.sleep(self.policy.settings.heartbeat_s)
            await msg.in_progress()


def inbound_problems(subject: str, body: bytes) -> tuple[str, list[str]] | None:
    """Why `body` is not an event of `subject` (a reason and the problems, each naming its
    field), or None when it is one. Never raises, whatever the bytes."""
    try:
        model = event_for_subject(subject)
    except KeyError:
        return "no event is defined for this subject", [f"subject: {subject}"]
    try:
        doc = json.loads(body)
    except RecursionError:
        return "the body is not readable JSON", ["<body>: nested too deeply to parse"]
    except UnicodeDecodeError as e:
        return "the body is not readable JSON", [f"<body>: not UTF-8 ({e.reason} at byte {e.start})"]
    except ValueError as e:
        return "the body is not readable JSON", [f"<body>: not JSON ({e})"[:300]]
    except Exception as e:  # whatever else a parser may raise on hostile bytes
        return "the body is not readable JSON", [f"<body>: {type(e).__name__}: {e}"[:300]]
    if not isinstance(doc, dict):
        return "the body is not a CloudEvents envelope", [f"<body>: a JSON {type(doc).__name__}, not an object"]
    if missing := [name for name in ENVELOPE_ATTRIBUTES if name not in doc]:
        return (f"the envelope lacks {', '.join(missing)}",
                [f"{name}: required in a received CloudEvents envelope" for name in missing])
    try:
        model.model_validate(doc)
    except ValidationError as e:
        return "payload does not match its schema", field_errors(e)
    except Exception as e:  # RecursionError in a deeply nested field, say
        return "payload does not match its schema", [f"<body>: {type(e).__name__}: {e}"[:300]]
    return None


def field_errors(error: ValidationError, *, skip: int = 0) -> list[str]:
    """Each problem as `field.path: message (got value)`, the value cut to 80 characters;
    `skip` leading parts of the path left out (a handler's argument name, say)."""
    problems = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"][skip:]) or "<body>"
        got = f" (got {redacted(problem['input'])!r:.80})" if problem["type"] != "missing" else ""
        if any(CREDENTIAL.search(str(part)) for part in problem["loc"]):
            got = ""  # the input is the credential itself: a dead letter is stored and shown
        problems.append(f"{field}: {problem['msg']}{got}")
    return problems


def redacted(value: Any, secret: bool = False) -> Any:
    """`value` (parsed JSON, or a validation error's input) with every string under a key that
    looks like a credential, at any depth, replaced by REDACTED. Numbers stay: `max_tokens`
    matches the pattern too, and no credential is a number."""
    if isinstance(value, dict):
        return {k: redacted(v, secret or bool(CREDENTIAL.search(str(k))))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(v, secret) for v in value]
    return REDACTED if secret and isinstance(value, str | bytes) else value


# `"<a key that looks like a credential>": "<value>"` in bytes that are not JSON (one broken
# comma away from it, say), where `redacted` cannot parse them.
_SECRET_MEMBER = re.compile(  # bounded key parts: no quadratic search on hostile bytes
    rb'("[^"\\]{0,100}(?:' + CREDENTIAL.pattern.encode() + rb')[^"\\]{0,100}"\s*:\s*)'
    rb'"(?:[^"\\]|\\.)*"', re.IGNORECASE)


def redacted_body(body: bytes) -> bytes:
    """The body a dead letter keeps: `body` itself unless it holds a credential, else a copy
    with their values replaced by REDACTED. Never raises."""
    try:
        doc = json.loads(body)
        clean = redacted(doc)
        if clean == doc:
            return body
        return json.dumps(clean, ensure_ascii=False).encode()
    except Exception:  # not JSON, or nested too deeply to walk: redact what looks like a member
        return _SECRET_MEMBER.sub(rb'\1"' + REDACTED.encode() + rb'"', body)


def _job_id_of(body: bytes) -> str:
    """The job id of a message, as far as it can be read; "unknown" otherwise. Never raises."""
    try:
        doc = json.loads(body)
        job_id = doc.get("subject") or doc.get("data", {}).get("job_id")
    except Exception:  # not JSON, not UTF-8, nested too deeply, not an object…
        return "unknown"
    if isinstance(job_id, str) and job_id.replace("-", "").replace("_", "").isalnum() and len(job_id) <= 128:
        return job_id
    return "unknown"


def _stream_seq(raw: Any) -> int | None:
    try:
        return raw.metadata.sequence.stream
    except Exception:
        return None
