"""A real code generator (datamodel-code-generator) builds types from the committed JSON Schemas,
and those types read the golden examples and mean the same defaults as the models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tunebus.contracts import TrainingRequested, export

codegen = pytest.importorskip("datamodel_code_generator", reason="pip install -e '.[dev]'")

CONTRACTS = Path(export.__file__).parent
EXAMPLES = sorted((CONTRACTS / "examples" / "v1").glob("*.json"))


def generated(stem: str, tmp_path: Path):
    """The module datamodel-code-generator writes for one schema file, imported."""
    source = CONTRACTS / "schemas" / f"{stem}.json"
    out = tmp_path / f"gen_{stem.replace('.', '_')}.py"
    codegen.generate(source.read_text(), input_file_type=codegen.InputFileType.JsonSchema,
                     output=out, output_model_type=codegen.DataModelType.PydanticV2BaseModel,
                     enum_field_as_literal=codegen.LiteralType.All,
                     formatters=[codegen.Formatter.BUILTIN])
    spec = importlib.util.spec_from_file_location(out.stem, out)
    module = importlib.util.module_from_spec(spec)
    sys.modules[out.stem] = module  # the generated annotations are resolved through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[out.stem]
    return getattr(module, json.loads(source.read_text())["title"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_generated_types_read_the_golden_examples(path, tmp_path):
    doc = json.loads(path.read_text())
    event = generated(doc["dataschema"].removeprefix("urn:tunebus:schema:"), tmp_path).model_validate(doc)
    assert event.subject == doc["subject"] and event.type == doc["type"]
    assert event.model_dump(mode="json", exclude_unset=True)["data"].keys() == doc["data"].keys()


@pytest.mark.parametrize("stem", sorted(s for s in export.schema_names() if s.count(".") == 3 and
                                        s.split(".")[2][0].isupper()))
def test_generated_request_reply_types_compile(stem, tmp_path):
    assert generated(stem, tmp_path).model_fields


def test_a_generated_requests_defaults_mean_the_models_defaults(tmp_path):
    """A client built from the schema that fills in only what is required sends a request the
    trainer reads exactly as it reads one with the fields left out."""
    doc = json.loads((CONTRACTS / "examples" / "v1" / "tunebus.training.requested.v1.json").read_text())
    Event = generated("tunebus.training.requested.v1", tmp_path)
    required = {k: doc["data"][k] for k in TrainingRequested.model_json_schema()["required"]}
    minimal = {**doc, "data": required}
    sent = Event.model_validate(minimal).model_dump(mode="json")["data"]
    assert TrainingRequested.model_validate(sent) == TrainingRequested.model_validate(required)
