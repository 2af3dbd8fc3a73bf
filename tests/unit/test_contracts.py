"""The wire contracts: committed files match the models, v1 stays readable, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from tunebus.contracts import EVENTS, TrainingRequestedEvent, event_for_subject, export, subjects
from tunebus.contracts.deadletter import DeadLetterEvent

CONTRACTS = Path(export.__file__).parent
EXAMPLES = sorted((CONTRACTS / "examples" / "v1").glob("*.json"))
BY_TYPE = {event.event_type(): event for event in [*EVENTS.values(), DeadLetterEvent]}


def test_committed_schemas_and_asyncapi_match_the_models():
    stale = [path for path, text in export.rendered_files().items()
             if not path.exists() or path.read_text() != text]
    assert stale == [], "run: python -m tunebus.contracts.export"


def test_every_event_has_a_golden_example():
    example_types = {json.loads(p.read_text())["type"] for p in EXAMPLES}
    assert example_types == {e.event_type() for e in EVENTS.values()}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_v1_examples_still_parse(path):
    doc = json.loads(path.read_text())
    event = BY_TYPE[doc["type"]].model_validate(doc)
    assert event.subject == event.data.job_id


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_examples_satisfy_the_committed_json_schema(path):
    doc = json.loads(path.read_text())
    schema = json.loads((CONTRACTS / "schemas" / f"{doc['type']}.json").read_text())
    jsonschema.validate(doc, schema)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["added_in_v1_5"] = {"anything": True}
    doc["data"]["new_knob"] = 3
    doc["data"]["hyperparameters"]["new_schedule"] = "cosine"
    event = TrainingRequestedEvent.model_validate(doc)
    assert event.data.hyperparameters.learning_rate == 0.0002


def test_type_carries_the_major_version_and_subjects_are_versioned():
    for subject, event in EVENTS.items():
        assert subject.startswith("tunebus.v1.")
        assert event.event_type().endswith(".v1")
        assert event_for_subject(subject) is event


def test_a_v1_reader_refuses_another_major_version():
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["type"] = "tunebus.training.requested.v2"
    with pytest.raises(ValidationError, match="type"):
        TrainingRequestedEvent.model_validate(doc)


def test_subject_must_be_the_job_id():
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["subject"] = "another-job"
    with pytest.raises(ValidationError, match="subject"):
        TrainingRequestedEvent.model_validate(doc)


@pytest.mark.parametrize("patch, field", [
    ({"hyperparameters": {"epochs": 2, "iters": 10}}, "epochs or iters"),
    ({"adapter_name": "Has Spaces"}, "adapter_name"),
    ({"job_id": "../etc/passwd"}, "job_id"),
    ({"dataset": {"uri": "/local/file.jsonl"}}, "dataset.uri"),
    ({"adapter": {"quantization": "3bit"}}, "adapter.quantization"),
])
def test_bad_requests_name_the_field(patch, field):
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["data"].update(patch)
    if "job_id" in patch:
        doc["subject"] = patch["job_id"]
    with pytest.raises(ValidationError) as info:
        TrainingRequestedEvent.model_validate(doc)
    assert field.split(".")[0] in str(info.value)


def test_neither_epochs_nor_iters_means_one_epoch():
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["data"]["hyperparameters"] = {}
    assert TrainingRequestedEvent.model_validate(doc).data.hyperparameters.epochs == 1


def test_request_reply_subjects_are_not_captured_by_a_stream():
    stream_prefixes = [s.removesuffix(">") for s in
                       subjects.EVENTS_STREAM_SUBJECTS + subjects.DEAD_LETTER_STREAM_SUBJECTS]
    for rpc in (subjects.REGISTRY_LIST, subjects.REGISTRY_GET, subjects.REGISTRY_DOWNLOAD_URL):
        assert not any(rpc.startswith(prefix) for prefix in stream_prefixes)
