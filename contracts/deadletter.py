"""Messages that a consumer could not accept, kept with the reason instead of being dropped."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload


class DeadLetter(Payload):
    """`job_id` is the job's when it could be read from the message, else "unknown"."""

    service: str
    original_subject: str
    reason: str
    errors: list[str] = []
    deliveries: int = 1
    headers: dict[str, str] = {}
    body_base64: str = Field(
        description="The message body, byte for byte unless a field named like a credential "
        "is in it: its value then reads \"<redacted>\" (body_sha256 stays the original's); only "
        "its first KiB when body_complete is false (the body was too large to travel here: the "
        "stream holds it at stream_sequence).")
    body_complete: bool = True
    body_size: int | None = Field(default=None, description="Bytes in the original body.")
    body_sha256: str | None = None
    stream_sequence: int | None = Field(
        default=None, description="Where the original lies in its stream (TUNEBUS_EVENTS).")


class DeadLetterEvent(Envelope[DeadLetter]):
    type: Literal["tunebus.deadletter.v1"] = "tunebus.deadletter.v1"


class ReplayDeadLetter(Model):
    """Ask the service that publishes a dead letter's original subject to publish its body there
    again (`tunebus.v1.replay.<service>`, operators only). The service reads the dead letter from
    TUNEBUS_DEADLETTER itself: the request names it, it cannot supply the bytes."""

    sequence: int = Field(ge=1, description="The dead letter's sequence in TUNEBUS_DEADLETTER.")
    reason: str = Field(default="", max_length=1000, description="Why; logged by the service.")


class ReplayReply(Model):
    sequence: int = Field(description="The dead letter that was replayed.")
    subject: str | None = Field(default=None, description="Where its body was published again.")
    stream_sequence: int | None = Field(
        default=None, description="The replayed copy's sequence in TUNEBUS_EVENTS.")
    duplicate: bool = Field(
        default=False, description="JetStream already held this replay (the same dead letter, "
        "replayed within the stream's duplicate window): nothing new was published.")
    error: str | None = None
