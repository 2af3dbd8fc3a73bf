"""What happens to a message a consumer could not finish: the delivery policy of every service.

FastStream's NATS default (REJECT_ON_ERROR) terminates a message on any exception, so one flaky
S3 call would lose a training request. tunebus decides instead:

- success                      -> ack.
- the payload fails its schema -> terminate, and publish it to `tunebus.v1.deadletter.<service>`
                                  with the reason; the consumer goes on with the next message.
- `PermanentError`             -> the same: retrying cannot help.
- any other exception          -> nak with an exponential delay, so JetStream redelivers it; after
                                  `max_deliveries` attempts it is dead-lettered like the above.
- the service shuts down       -> nak at once, so another worker takes the message over.

While a handler runs, an in-progress ack goes out every `heartbeat_s`, so long work (training)
is not redelivered to a second worker while the first is still busy.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import TYPE_CHECKING, Any

import structlog
from faststream.middlewares import BaseMiddleware
from pydantic import ValidationError

from tunebus.contracts import DeadLetter, DeadLetterEvent, subjects
from tunebus.contracts.catalog import event_for_subject

from .settings import DeliverySettings

if TYPE_CHECKING:
    from faststream.nats import NatsBroker
    from faststream.nats.message import NatsMessage

log = structlog.get_logger()


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
        dead = DeadLetter(
            job_id=_job_id_of(raw.data),
            service=self.service,
            original_subject=raw.subject,
            reason=reason,
            errors=errors[:50],
            deliveries=deliveries,
            headers={k: v for k, v in (raw.headers or {}).items()},
            body_base64=base64.b64encode(raw.data).decode(),
        )
        event = DeadLetterEvent.wrap(dead, source=f"tunebus/{self.service}")
        assert self.broker is not None
        await self.broker.publish(
            event.model_dump_json().encode(),
            subjects.dead_letter(self.service),
            headers={"Nats-Msg-Id": f"dlq:{raw.subject}:{_stream_seq(raw)}"},
            stream=subjects.DEAD_LETTER_STREAM,
        )
        log.error("dead-lettered", reason=reason, subject=raw.subject, errors=errors[:5])


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
            invalid = _schema_errors(raw.subject, raw.data)
            if invalid:
                await policy.dead_letter(msg, "payload does not match its schema", invalid, deliveries)
                await msg.reject()
                return None
            if deliveries > policy.settings.max_deliveries:
                await policy.dead_letter(msg, "too many delivery attempts", [], deliveries)
                await msg.reject()
                return None

            heartbeat = asyncio.create_task(self._heartbeat(msg))
            try:
                result = await call_next(msg)
            except PermanentError as e:
                await policy.dead_letter(msg, str(e), [repr(e)], deliveries)
                await msg.reject()
                return None
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
                    await policy.dead_letter(msg, f"failed {deliveries} times: {e}", [repr(e)], deliveries)
                    await msg.reject()
                    return None
                delay = policy.retry_delay(deliveries)
                log.warning("will retry", error=repr(e), deliveries=deliveries, delay_s=delay)
                await msg.nack(delay=delay)
                return None
            finally:
                heartbeat.cancel()
            await msg.ack()
            return result
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "event_id")

    async def _heartbeat(self, msg: NatsMessage) -> None:
        while True:
            await asyncio.sleep(self.policy.settings.heartbeat_s)
            await msg.in_progress()


def _schema_errors(subject: str, body: bytes) -> list[str]:
    try:
        model = event_for_subject(subject)
    except KeyError:
        return [f"no event is defined for subject {subject}"]
    try:
        model.model_validate_json(body)
    except ValidationError as e:
        return field_errors(e)
    return []


def field_errors(error: ValidationError, *, skip: int = 0) -> list[str]:
    """Each problem as `field.path: message (got value)`, the value cut to 80 characters;
    `skip` leading parts of the path left out (a handler's argument name, say)."""
    problems = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"][skip:]) or "<body>"
        got = f" (got {problem['input']!r:.80})" if problem["type"] != "missing" else ""
        problems.append(f"{field}: {problem['msg']}{got}")
    return problems


def _job_id_of(body: bytes) -> str:
    """The job id of a message, as far as it can be read; "unknown" otherwise."""
    try:
        doc = json.loads(body)
        job_id = doc.get("subject") or doc.get("data", {}).get("job_id")
    except (ValueError, AttributeError):
        return "unknown"
    if isinstance(job_id, str) and job_id.replace("-", "").replace("_", "").isalnum() and len(job_id) <= 128:
        return job_id
    return "unknown"


def _stream_seq(raw: Any) -> int:
    return raw.metadata.sequence.stream
