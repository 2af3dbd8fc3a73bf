"""Replaying a dead letter (tunebus.shared.replay): what is republished, with which headers, and
who republishes it."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from tunebus.contracts import DeadLetter, subjects
from tunebus.shared.delivery import redacted_body
from tunebus.shared.identities import ROLES, published_events, publisher_of
from tunebus.shared.replay import NotReplayable, is_event_subject, original_body, replay_headers

BODY = b'{"specversion": "1.0"}' * 100


def letter(body: bytes = BODY, complete: bool = True, **fields) -> DeadLetter:
    kept = body if complete else body[:16]
    return DeadLetter(job_id="j", service="trainer", original_subject=subjects.DATASET_VALIDATED,
                      reason="r", body_base64=base64.b64encode(kept).decode(), body_complete=complete,
                      body_size=len(body), body_sha256=hashlib.sha256(body).hexdigest(), **fields)


def read(events: dict[int, bytes]):
    async def read_event(seq: int) -> bytes | None:
        return events.get(seq)
    return read_event


def test_a_replay_drops_jetstreams_headers_and_names_its_dead_letter():
    headers = replay_headers(letter(headers={"Nats-Msg-Id": "orig", "nats-expected-stream": "X",
                                             "ce-type": "t"}), 17)
    assert headers == {"ce-type": "t", "Nats-Msg-Id": "replay:17", "Tunebus-Replay-Of": "17"}


def test_a_complete_body_is_replayed_byte_for_byte():
    assert asyncio.run(original_body(letter(), read({}))) == BODY


def test_a_body_kept_by_reference_is_read_back_from_the_stream_if_it_still_matches():
    assert asyncio.run(original_body(letter(complete=False, stream_sequence=5), read({5: BODY}))) == BODY
    with pytest.raises(NotReplayable, match="no longer holds it at sequence 5"):
        asyncio.run(original_body(letter(complete=False, stream_sequence=5), read({5: b"other"})))
    with pytest.raises(NotReplayable, match="no stream sequence"):
        asyncio.run(original_body(letter(complete=False), read({})))


def test_a_body_kept_redacted_is_never_replayed_but_its_original_is_read_back():
    original = b'{"data": {"wandb": {"api_key": "SUPERSECRET"}}}'
    redacted = letter(original, stream_sequence=5).model_copy(
        update={"body_base64": base64.b64encode(redacted_body(original)).decode()})
    assert asyncio.run(original_body(redacted, read({5: original}))) == original
    with pytest.raises(NotReplayable, match="credentials redacted.*no longer holds it at sequence 5"):
        asyncio.run(original_body(redacted, read({})))
    with pytest.raises(NotReplayable, match="credentials redacted.*no stream sequence"):
        asyncio.run(original_body(redacted.model_copy(update={"stream_sequence": None}), read({})))


def test_only_event_subjects_are_replayed():
    assert is_event_subject(subjects.TRAINING_REQUESTED) and is_event_subject(subjects.ADAPTER_REGISTERED)
    assert not is_event_subject(subjects.dead_letter("trainer"))
    assert not is_event_subject(subjects.REGISTRY_PROMOTE)


def test_each_subject_is_replayed_by_the_identity_that_publishes_it():
    assert publisher_of(subjects.TRAINING_REQUESTED) is None  # a client's: the operator's own
    assert subjects.TRAINING_REQUESTED in ROLES["operator"].publish
    assert publisher_of(subjects.DATASET_VALIDATED) == "dataset-validator"
    assert publisher_of(subjects.TRAINING_COMPLETED) == "trainer"
    assert publisher_of(subjects.EVALUATION_COMPLETED) == "evaluator"
    assert subjects.DATASET_VALIDATED not in published_events("trainer")


def test_only_operators_may_ask_a_service_to_replay_and_no_client_publishes_service_events():
    for name in ("observer", "submitter"):
        assert not any(p.startswith(subjects.REPLAY) for p in ROLES[name].publish)
    assert f"{subjects.REPLAY}.*" in ROLES["operator"].publish
    for service in ("dataset-validator", "trainer", "evaluator", "adapter-registry"):
        assert subjects.replay(service) in ROLES[service].subscribe
        assert not published_events(service) & set(ROLES["operator"].publish)
