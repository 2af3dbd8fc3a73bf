"""The wire contracts: committed files match the models, v1 stays readable, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from tunebus.contracts import (
    EVENTS,
    Artifact,
    TrainingCompleted,
    TrainingRequestedEvent,
    event_for_subject,
    export,
    subjects,
)
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


def test_a_completed_event_from_before_the_typed_fields_says_them_as_it_did_then():
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.completed.v1.json").read_text())
    data = doc["data"]
    curve = dict(data["artifacts"][0], name="loss_curve.json")
    old = TrainingCompleted.model_validate(
        data | {"resolved_args": {"mask_prompt": False}, "artifacts": [*data["artifacts"], curve]})
    assert old.mask_prompt is False and old.loss_curve_artifact() == Artifact.model_validate(curve)
    golden = TrainingCompleted.model_validate(data)
    assert golden.mask_prompt is True and golden.loss_curve is None and golden.loss_curve_artifact() is None
    said = TrainingCompleted.model_validate(
        data | {"mask_prompt": True, "resolved_args": {"mask_prompt": False}, "loss_curve": None,
                "artifacts": [*data["artifacts"], curve]})
    assert said.mask_prompt is True and said.loss_curve_artifact() is None


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


SCHEMAS = sorted((CONTRACTS / "schemas").glob("*.json"))


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_every_schema_declares_its_dialect_and_id(path):
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:tunebus:schema:{path.stem}"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_an_events_dataschema_names_the_schema_it_satisfies(path):
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in (json.loads(p.read_text()) for p in SCHEMAS))
    doc = json.loads(path.read_text())
    schema = registry.contents(doc["dataschema"])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)
    wrapped = BY_TYPE[doc["type"]].wrap(BY_TYPE[doc["type"]].model_validate(doc).data, source="t")
    assert wrapped.dataschema == doc["dataschema"]


def _models_in(model) -> dict[str, type]:
    """`model` and every model its fields hold, by class name (as the schemas' $defs name them)."""
    import typing

    from pydantic import BaseModel

    found, todo = {}, [model]
    while todo:
        current = todo.pop()
        if current.__name__ in found:
            continue
        found[current.__name__] = current
        for field in current.model_fields.values():
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack += list(typing.get_args(t))
    return found


@pytest.mark.parametrize("stem", sorted(export.schema_names()))
def test_schema_defaults_are_the_models_defaults(stem):
    """A client that sends a schema's default gets what it would get by leaving the field out."""
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    schema = json.loads((CONTRACTS / "schemas" / f"{stem}.json").read_text())
    models = _models_in(export.schema_names()[stem])
    definitions = {export.schema_names()[stem].__name__: schema, **schema.get("$defs", {})}
    compared = 0
    for name, definition in definitions.items():
        model = models[name]
        for field, prop in definition.get("properties", {}).items():
            if "default" not in prop:
                continue
            default = model.model_fields[field].default
            if isinstance(default, BaseModel):
                assert type(default).model_validate(prop["default"]) == default, (name, field)
                # and nothing in it contradicts the nested schema's own defaults
                nested = definitions[type(default).__name__]["properties"]
                assert all(nested[k].get("default") == v for k, v in prop["default"].items()), (name, field)
            else:
                assert prop["default"] == to_jsonable_python(default), (name, field)
            compared += 1
    assert compared or not any("default" in p for d in definitions.values()
                               for p in d.get("properties", {}).values())


def test_the_request_schema_shows_no_default_epochs():
    schema = json.loads((CONTRACTS / "schemas" / "tunebus.training.requested.v1.json").read_text())
    request = schema["$defs"]["TrainingRequested"]["properties"]["hyperparameters"]
    assert "epochs" not in request["default"]
    assert schema["$defs"]["Hyperparameters"]["properties"]["epochs"]["default"] is None


ASYNCAPI = sorted((CONTRACTS / "asyncapi").glob("*.yaml"))


@pytest.mark.parametrize("path", ASYNCAPI, ids=lambda p: p.stem)
def test_every_request_reply_operation_has_its_reply_message_and_schema(path):
    import yaml

    doc = yaml.safe_load(path.read_text())
    stream_prefixes = [s.removesuffix(">") for s in
                       subjects.EVENTS_STREAM_SUBJECTS + subjects.DEAD_LETTER_STREAM_SUBJECTS]

    def at(ref: str):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    for key, operation in doc["operations"].items():
        address = at(operation["channel"]["$ref"])["address"]
        if operation["action"] != "receive" or any(address.startswith(p) for p in stream_prefixes):
            continue
        reply = operation["reply"]  # a request/reply subject: not in a stream
        assert at(reply["channel"]["$ref"])["address"] is None, key  # the requester's inbox
        expected = export.STREAMED_REPLIES.get(address, (export.REPLIES[address],))
        names = []
        for message in reply["messages"]:
            payload = at(at(message["$ref"])["$ref"])["payload"]
            schema = at(payload["$ref"])
            assert schema["properties"], key
            names.append(payload["$ref"].rsplit("/", 1)[-1])
        assert sorted(names) == sorted(m.__name__ for m in expected), key
    bindings = [b for o in doc["operations"].values() for b in o.get("bindings", {}).values()]
    assert all(b["bindingVersion"] == export.NATS_BINDING_VERSION for b in bindings)
    assert "bindingVersion: custom" not in path.read_text()


def _request_with_probes(probes: list[dict]) -> bytes:
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    doc["data"]["evaluation"] = {"probes": probes}
    return json.dumps(doc).encode()


@pytest.mark.parametrize("probes, field", [
    ([{"prompt": "p"}] * 65, "data.evaluation.probes"),
    ([{"prompt": "p"}, {"prompt": "x" * 8001}], "data.evaluation.probes.1.prompt"),
])
def test_a_request_with_too_many_or_too_long_probes_is_refused_naming_the_field(probes, field):
    from tunebus.shared.delivery import inbound_problems

    at_the_limits = [{"prompt": "x" * 8000}] * 64
    assert inbound_problems(subjects.TRAINING_REQUESTED, _request_with_probes(at_the_limits)) is None
    _, errors = inbound_problems(subjects.TRAINING_REQUESTED, _request_with_probes(probes))
    assert [e.split(":")[0] for e in errors] == [field], errors
