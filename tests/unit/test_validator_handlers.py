"""The validator's handlers, as logic: FastStream's TestNatsBroker and in-memory job claims stand
in for NATS (tests/integration/test_validator.py runs them on a real server and S3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faststream.nats import TestNatsBroker

from tunebus.contracts import TrainingRequestedEvent, export, subjects
from tunebus.services.dataset_validator import app
from tunebus.services.dataset_validator.config import ValidatorSettings
from tunebus.shared.bus import EVENTS
from tunebus.shared.jobs import Stage, content_digest

from tests.helpers.services import service_in_memory

pytestmark = pytest.mark.anyio
EXAMPLE = Path(export.__file__).parent / "examples" / "v1" / "tunebus.training.requested.v1.json"


class DownStore:
    """An object store whose every call fails, as S3 past its retries would."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("S3 is down")
        return fail


@pytest.fixture
def validator_bus():
    """(service, refusals): the validator's handlers on a test broker, S3 down; `refusals` are
    the TrainingRefused events they publish."""
    service = service_in_memory(app.NAME, DownStore())
    app.subscribe(service, ValidatorSettings())
    refusals: list[dict] = []

    @service.broker.subscriber(subjects.TRAINING_REFUSED, stream=EVENTS)
    async def refused(body: dict) -> None:
        refusals.append(body["data"])

    return service, refusals


def request(**changes) -> TrainingRequestedEvent:
    doc = json.loads(EXAMPLE.read_text())
    doc["data"] |= changes
    return TrainingRequestedEvent.model_validate(doc | {"id": f"event-{len(changes)}"})


async def test_a_job_id_taken_by_another_request_is_refused_as_a_conflict_naming_the_holder(validator_bus):
    service, refusals = validator_bus
    first = request()
    await service.claims.claim(Stage.VALIDATE, first.data.job_id, "the-first-event",
                               content_digest(first.data))
    other = request(adapter_name="someone-else")
    async with TestNatsBroker(service.broker) as bus:
        await bus.publish(other.model_dump(mode="json"), subjects.TRAINING_REQUESTED)
    [refusal] = refusals
    assert refusal["code"] == "conflict" and refusal["original_event_id"] == "the-first-event"
    assert refusal["event_id"] == other.id and refusal["request_sha256"] == content_digest(other.data)
    assert refusal["original_request_sha256"] == content_digest(first.data)
    assert "taken by a different request" in refusal["reason"]


async def test_the_same_request_sent_again_is_refused_as_a_duplicate(validator_bus):
    service, refusals = validator_bus
    first = request()
    await service.claims.claim(Stage.VALIDATE, first.data.job_id, "the-first-event",
                               content_digest(first.data))
    again = request().model_copy(update={"id": "a-second-event"})
    async with TestNatsBroker(service.broker) as bus:
        await bus.publish(again.model_dump(mode="json"), subjects.TRAINING_REQUESTED)
    assert [(r["code"], r["original_event_id"]) for r in refusals] == [("duplicate", "the-first-event")]
    assert f"tunebus status {first.data.job_id}" in refusals[0]["reason"]


async def test_the_holding_event_redelivered_after_its_answer_says_nothing_more(validator_bus):
    service, refusals = validator_bus
    event = request()
    digest = content_digest(event.data)
    await service.claims.claim(Stage.VALIDATE, event.data.job_id, event.id, digest)
    await service.claims.finish(Stage.VALIDATE, event.data.job_id, event.id, digest)
    async with TestNatsBroker(service.broker) as bus:
        await bus.publish(event.model_dump(mode="json"), subjects.TRAINING_REQUESTED)
    assert refusals == []


async def test_a_check_the_validator_cannot_carry_out_is_answered_with_the_reason(validator_bus):
    service, _ = validator_bus
    async with TestNatsBroker(service.broker) as bus:
        reply = await (await bus.request({"uri": "s3://tunebus-datasets/uploads/x.jsonl"},
                                         subjects.VALIDATOR_VALIDATE)).decode()
    assert reply["valid"] is False and reply["error_counts"] == {"unreadable": 1}
    assert reply["reason"] == ("the validator could not read s3://tunebus-datasets/uploads/x.jsonl: "
                               "S3 is down")
