"""What a consumer makes of a received body, whatever its bytes (shared/delivery.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunebus.contracts import subjects
from tunebus.shared.delivery import (
    ENVELOPE_ATTRIBUTES, REDACTED, DeliveryPolicy, _job_id_of, inbound_problems, redacted_body)
from tunebus.shared.settings import DeliverySettings

EXAMPLE = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.training.requested.v1.json"


@given(st.binary(max_size=2000))
def test_reading_any_bytes_never_raises(body):
    assert isinstance(_job_id_of(body), str)
    assert inbound_problems(subjects.TRAINING_REQUESTED, body) is not None


@pytest.mark.parametrize("nesting", [10, 5000, 100_000])
def test_deep_nesting_is_a_reason_not_an_exception(nesting):
    body = b"[" * nesting + b"]" * nesting
    assert _job_id_of(body) == "unknown"
    assert inbound_problems(subjects.TRAINING_REQUESTED, body) is not None


@pytest.mark.parametrize("attribute", ENVELOPE_ATTRIBUTES)
def test_a_received_envelope_without_a_cloudevents_attribute_names_it(attribute):
    doc = json.loads(EXAMPLE.read_text())
    assert inbound_problems(subjects.TRAINING_REQUESTED, json.dumps(doc).encode()) is None
    del doc[attribute]
    reason, errors = inbound_problems(subjects.TRAINING_REQUESTED, json.dumps(doc).encode())
    assert reason == f"the envelope lacks {attribute}"
    assert errors == [f"{attribute}: required in a received CloudEvents envelope"]


# -- a dead letter never carries a credential

KEY = "SUPERSECRET-0123456789"


def request_with(**data) -> bytes:
    doc = json.loads(EXAMPLE.read_text())
    doc["data"].update(data)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("integrations", [
    [{"type": "wandbx", "wandb": {"project": "p", "api_key": KEY}}],  # unknown discriminator
    [{"type": "tensorboard"}] * 3 + [{"type": "wandb", "wandb": {"project": "p", "token": KEY}}],
    [{"type": "mlflow", "mlflow": {"experiment": "e", "credentials": {"user": "u", "pass": KEY}}}],
])
def test_a_refused_request_names_the_field_without_echoing_a_nested_credential(integrations):
    reason, errors = inbound_problems(subjects.TRAINING_REQUESTED, request_with(integrations=integrations))
    assert reason == "payload does not match its schema"
    assert errors and all(KEY not in e for e in errors), errors
    assert any(e.startswith("data.integrations") for e in errors), errors


def test_an_echoed_input_keeps_what_is_not_a_credential():
    _, errors = inbound_problems(subjects.TRAINING_REQUESTED, request_with(
        integrations=[{"type": "wandbx", "wandb": {"project": "p", "api_key": KEY}}]))
    assert any(f"'api_key': '{REDACTED}'" in e and "'project': 'p'" in e for e in errors), errors


def test_the_kept_body_redacts_credentials_at_any_depth_and_keeps_the_rest():
    body = request_with(integrations=[{"type": "wandb", "wandb": {"project": "p", "API_KEY": KEY}}],
                        hyperparameters={"max_tokens": 7})
    kept = json.loads(redacted_body(body))
    assert KEY.encode() not in redacted_body(body)
    assert kept["data"]["integrations"][0]["wandb"] == {"project": "p", "API_KEY": REDACTED}
    assert kept["data"]["hyperparameters"]["max_tokens"] == 7  # a number is never a credential
    clean = request_with()
    assert redacted_body(clean) == clean  # byte for byte when there is nothing to hide


@pytest.mark.parametrize("body", [
    b'{"data": {"wandb": {"api_key": "' + KEY.encode() + b'",}}',  # not JSON: a trailing comma
    b'{"password" : "' + KEY.encode() + b'\\" still"' + b"\xff",  # an escaped quote, not UTF-8
])
def test_a_body_that_is_not_json_still_has_its_credentials_redacted(body):
    kept = redacted_body(body)
    assert KEY.encode() not in kept and REDACTED.encode() in kept


def test_a_dead_letter_keeps_no_credential_in_body_errors_or_headers():
    sent = []

    class Broker:
        async def publish(self, message, subject, **_):
            sent.append(json.loads(message))

    body = request_with(integrations=[{"type": "wandbx", "wandb": {"project": "p", "api_key": KEY}}])
    policy = DeliveryPolicy("trainer", DeliverySettings())
    policy.bind(Broker())
    reason, errors = inbound_problems(subjects.TRAINING_REQUESTED, body)
    asyncio.run(policy.dead_letter_body(subjects.TRAINING_REQUESTED, body,
                                        {"Authorization": KEY, "ce-type": "t"}, 3, reason, errors, 1))
    (letter,) = sent
    assert KEY not in json.dumps(letter)
    dead = letter["data"]
    assert dead["headers"] == {"Authorization": REDACTED, "ce-type": "t"}
    assert dead["body_sha256"] == hashlib.sha256(body).hexdigest()  # the original's: see replay
    assert json.loads(base64.b64decode(dead["body_base64"]))["data"]["integrations"][0]["wandb"] == {
        "project": "p", "api_key": REDACTED}
