"""What a consumer makes of a received body, whatever its bytes (shared/delivery.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunebus.contracts import subjects
from tunebus.shared.delivery import ENVELOPE_ATTRIBUTES, _job_id_of, inbound_problems

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
