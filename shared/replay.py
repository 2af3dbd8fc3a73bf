"""Replaying a dead letter: its original body published again on its original subject, once the
cause is fixed, so that the consumers that gave up on it take it again.

Who may replay what (least privilege): the identity that may publish a subject replays it. A
dead-lettered `training.requested` is a client's message, and the operator, who may publish
requests anyway, republishes it itself. A subject a service publishes (`dataset.validated`,
`training.completed`, ...) stays that service's alone: the operator asks the service
(`tunebus.v1.replay.<service>`, which only operators may publish to), and the service reads the
dead letter from TUNEBUS_DEADLETTER by its sequence and republishes what it holds. An operator
can thereby only repeat a message the service's own subject once carried, never write one.

A replay's `Nats-Msg-Id` is `replay:<dead letter sequence>`: replaying the same dead letter twice
within the stream's duplicate window stores it once. `Tunebus-Replay-Of` names the dead letter.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

import structlog

from tunebus.contracts import DeadLetter, DeadLetterEvent, ReplayDeadLetter, ReplayReply, subjects

REPLAY_HEADER = "Tunebus-Replay-Of"

log = structlog.get_logger()


class NotReplayable(Exception):
    """This dead letter cannot be replayed (here): the message says why."""


def is_event_subject(subject: str) -> bool:
    """Whether `subject` is stored in the events stream, the only subjects a replay may target."""
    return any(subject.startswith(pattern.removesuffix(">"))
               for pattern in subjects.EVENTS_STREAM_SUBJECTS)


def replay_headers(dead: DeadLetter, sequence: int) -> dict[str, str]:
    """The original headers without JetStream's own (`Nats-*`: the original message id would
    make JetStream drop the replay as a duplicate), plus the replay's id and origin."""
    headers = {k: v for k, v in dead.headers.items() if not k.lower().startswith("nats-")}
    return {**headers, "Nats-Msg-Id": f"replay:{sequence}", REPLAY_HEADER: str(sequence)}


async def original_body(dead: DeadLetter,
                        read_event: Callable[[int], Awaitable[bytes | None]]) -> bytes:
    """The dead letter's body; one too large to travel inside it, or kept with its credentials
    redacted (its sha256 is then not the original's), is read back from the events stream
    (`read_event(sequence)`) and must still match its sha256: a redacted copy is never sent."""
    kept = base64.b64decode(dead.body_base64)
    if dead.body_complete and (dead.body_sha256 is None
                               or hashlib.sha256(kept).hexdigest() == dead.body_sha256):
        return kept
    why = ("the dead letter keeps the body with its credentials redacted (a request never "
           "carries any: send it again without them)" if dead.body_complete else
           f"the body ({dead.body_size} bytes) was too large to keep in the dead letter")
    if dead.stream_sequence is None:
        raise NotReplayable(f"{why}, and no stream sequence says where the original is")
    body = await read_event(dead.stream_sequence)
    if body is None or hashlib.sha256(body).hexdigest() != dead.body_sha256:
        raise NotReplayable(f"{why}, and {subjects.EVENTS_STREAM} no longer holds it at sequence "
                            f"{dead.stream_sequence}")
    return body


async def answer_replay(js, service: str, publishes: frozenset[str],
                        request: ReplayDeadLetter) -> ReplayReply:
    """What a service does with a replay request: republish the dead letter at `sequence` if its
    original subject is one this service publishes."""
    reply = ReplayReply(sequence=request.sequence)
    try:
        msg = await js.get_msg(subjects.DEAD_LETTER_STREAM, request.sequence)
    except Exception as e:  # noqa: BLE001 - NotFound, or a deleted message: either way, say it
        return reply.model_copy(update={"error": f"no dead letter at sequence {request.sequence} "
                                        f"in {subjects.DEAD_LETTER_STREAM} ({e})"})
    try:
        dead = DeadLetterEvent.model_validate_json(msg.data).data
    except ValueError:
        return reply.model_copy(update={"error": f"sequence {request.sequence} of "
                                        f"{subjects.DEAD_LETTER_STREAM} is not a dead letter"})
    if dead.original_subject not in publishes:
        return reply.model_copy(update={
            "error": f"{service} does not publish {dead.original_subject}, so it does not "
            "replay it (ask the service that does)"})

    async def read_event(seq: int) -> bytes | None:
        try:
            return (await js.get_msg(subjects.EVENTS_STREAM, seq)).data
        except Exception:  # noqa: BLE001 - aged out of the stream
            return None

    try:
        body = await original_body(dead, read_event)
    except NotReplayable as e:
        return reply.model_copy(update={"error": str(e)})
    ack = await js.publish(dead.original_subject, body, headers=replay_headers(dead, request.sequence))
    log.warning("replayed a dead letter", sequence=request.sequence, subject=dead.original_subject,
                job_id=dead.job_id, stream_seq=ack.seq, duplicate=ack.duplicate,
                reason=request.reason)
    return reply.model_copy(update={"subject": dead.original_subject, "stream_sequence": ack.seq,
                                    "duplicate": bool(ack.duplicate)})
