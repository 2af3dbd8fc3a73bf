"""Messages that a consumer could not accept, kept with the reason instead of being dropped."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .envelope import Envelope, Payload


class DeadLetter(Payload):
    """`job_id` is the job's when it could be read from the message, else "unknown"."""

    service: str
    original_subject: str
    reason: str
    errors: list[str] = []
    deliveries: int = 1
    headers: dict[str, str] = {}
    body_base64: str = Field(description="The message body, byte for byte.")


class DeadLetterEvent(Envelope[DeadLetter]):
    type: Literal["tunebus.deadletter.v1"] = "tunebus.deadletter.v1"
