"""Every option of the training request explains itself: in the exported JSON schema each field
has a description, a default unless it is required, and each number a range; the README's table
of options is the schema's; the CLI offers the request's defaults."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from tunebus.contracts import Hyperparameters, TrainingRequested, options
from tunebus.contracts.export import README, json_schema
from tunebus.shared.cli.main import submit

SCHEMA_FILE = (Path(options.__file__).parent / "schemas" / "tunebus.training.requested.v1.json")
SCHEMA = json.loads(SCHEMA_FILE.read_text())
FIELDS = options.fields(SCHEMA["$defs"]["TrainingRequested"], SCHEMA)
PROPERTIES = {
    f"{name}.{field}": prop
    for name, model in SCHEMA["$defs"].items()
    for field, prop in model.get("properties", {}).items()
}
REQUIRED = {f"{name}.{field}" for name, model in SCHEMA["$defs"].items()
            for field in model.get("required", [])}


def _numbers(prop: dict) -> list[dict]:
    return [p for p in prop.get("anyOf", [prop]) if p.get("type") in ("integer", "number")]


@pytest.mark.parametrize("field", sorted(PROPERTIES))
def test_every_request_field_has_a_description_and_a_default_unless_required(field):
    prop = PROPERTIES[field]
    assert prop.get("description", "").strip(), f"{field} has no description"
    assert "default" in prop or field in REQUIRED, f"{field} has no default"


@pytest.mark.parametrize("field", sorted(f for f, p in PROPERTIES.items() if _numbers(p)))
def test_every_numeric_request_field_has_a_lower_bound(field):
    for number in _numbers(PROPERTIES[field]):
        assert {"minimum", "exclusiveMinimum"} & number.keys(), f"{field} has no range"


def test_the_readme_table_lists_every_field_as_the_schema_says():
    table = options.options_table(json_schema(TrainingRequested))
    readme = README.read_text()
    assert table in readme, "run: python -m tunebus.contracts.export"
    documented = {line.split("`")[1] for line in table.splitlines()[2:]}
    assert {"hyperparameters.learning_rate", "adapter.rank", "integrations[wandb].wandb.project",
            "evaluation.probes[].prompt"} <= documented
    assert len(documented) == len(FIELDS)


def test_the_table_says_default_range_and_meaning():
    row = next(r for r in FIELDS if r[0] == "hyperparameters.max_seq_length")
    assert row[1:3] == ("`2048`", "≥ 8") and "cut at the end" in row[3]
    assert next(r for r in FIELDS if r[0] == "dataset.uri")[1] == "required"


def test_the_cli_submits_the_requests_defaults():
    defaults = inspect.signature(submit).parameters
    for name in ("batch_size", "learning_rate", "max_seq_length"):
        assert defaults[name].default == Hyperparameters.model_fields[name].default, name


def test_a_negative_seed_is_refused_by_the_contract_not_by_numpy_mid_job():
    with pytest.raises(ValueError, match="seed"):
        Hyperparameters(seed=-1)
