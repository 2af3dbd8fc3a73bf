"""The CloudEvents 1.0 envelope that wraps every tunebus event (structured JSON mode).

    {"specversion": "1.0", "id": "…", "source": "tunebus/trainer", "type": "tunebus.training.completed.v1",
     "subject": "<job id>", "time": "…", "datacontenttype": "application/json",
     "dataschema": "urn:tunebus:schema:tunebus.training.completed.v1", "data": {…}}

`type` carries the major version; `subject` is always the job id. Unknown fields are ignored
everywhere (a v1 reader accepts v1 events from newer writers); a breaking change means a new
subject and type (v2), never an edit of a v1 model.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

JobId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"),
    Field(description="Caller-chosen id of the job; also its idempotency key."),
]


class Model(BaseModel):
    """Base of every wire model: tolerant of fields it does not know."""

    model_config = ConfigDict(extra="ignore")


class Payload(Model):
    job_id: JobId


P = TypeVar("P", bound=Payload)


def schema_id(name: str) -> str:
    """The `$id` of a contract's JSON Schema (contracts/schemas/<name>.json), and what an event's
    `dataschema` names: `urn:tunebus:schema:tunebus.training.completed.v1`."""
    return f"urn:tunebus:schema:{name}"


def new_event_id() -> str:
    return str(uuid.uuid4())


class Envelope(Model, Generic[P]):
    """Concrete events subclass this and fix `type` to a `Literal` of their versioned type."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=new_event_id, min_length=1)
    source: str = Field(min_length=1, description="The producing service, e.g. tunebus/trainer.")
    type: str
    subject: str = Field(description="The job id the event belongs to.")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = Field(
        default=None, description="The `$id` of the JSON Schema of this event: urn:tunebus:schema:<type>.")
    data: P

    @model_validator(mode="after")
    def _subject_is_the_job(self) -> Self:
        if self.subject != self.data.job_id:
            raise ValueError(f"subject {self.subject!r} is not data.job_id {self.data.job_id!r}")
        return self

    @classmethod
    def event_type(cls) -> str:
        return cls.model_fields["type"].default

    @classmethod
    def wrap(cls, data: P, *, source: str, id: str | None = None) -> Self:
        return cls(
            id=id or new_event_id(),
            source=source,
            type=cls.event_type(),
            subject=data.job_id,
            dataschema=schema_id(cls.event_type()),
            data=data,
        )
