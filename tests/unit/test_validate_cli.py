"""`tunebus validate PATH` offline: no stack, the validator's own code, exit 0 / 1 / 2."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunebus.shared.cli import app

FIXTURES = Path(__file__).parent.parent / "fixtures" / "datasets"


@pytest.fixture
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["validate", *map(str, args)], catch_exceptions=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]


def test_a_valid_file_exits_0_and_says_what_it_is(cli, tmp_path):
    result = cli(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert result.exit_code == 0, result.output
    assert "valid: alpaca format, 20 rows" in result.output and "suits sft" in result.output


def test_an_invalid_file_exits_1_and_json_says_where(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"instruction": "x", "output": 5}])
    result = cli(path, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["valid"] is False and report["format"] == "alpaca" and report["rows"] == 3
    assert report["errors"] == [{"file": str(path), "line": 3, "index": None, "field": "output",
                                 "message": "expected a string, got int", "kind": "wrong_type"}]
    assert report["warnings"] == []


def test_human_output_lists_errors_with_line_and_field(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"instruction": "x"}])
    result = cli(path)
    assert result.exit_code == 1
    assert "line 3: output: missing required field" in result.output


def test_the_method_decides_what_is_acceptable(cli):
    result = cli(FIXTURES / "preference.jsonl", "--method", "sft", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["reason"].startswith(
        "dataset is in preference format, which method 'sft' cannot train on")
    assert cli(FIXTURES / "preference.jsonl", "--method", "dpo").exit_code == 0


def test_gzip_bom_and_crlf_are_read(cli, tmp_path):
    text = "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in ROWS)
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(text.encode()))
    result = cli(path, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["rows"] == 20


def test_a_directory_of_splits_writes_canonical_files(cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ROWS[:10])
    write_jsonl(data / "validation.jsonl", ROWS[10:15])
    write_jsonl(data / "test.jsonl", ROWS[15:])
    out = tmp_path / "out"
    result = cli(data, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["train_rows"], report["valid_rows"], report["test_rows"]) == (10, 5, 5)
    valid = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert valid[0] == {"messages": [{"role": "user", "content": "q10"},
                                     {"role": "assistant", "content": "a10"}]}
    assert len((out / "test.jsonl").read_text().splitlines()) == 5


def test_no_output_is_left_behind_for_an_invalid_dataset(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "x"}])
    out = tmp_path / "out"
    assert cli(path, "--out", out).exit_code == 1
    assert not list(out.iterdir())


@pytest.mark.parametrize("args", [
    ["missing.jsonl"],
    ["{fixtures}/text.jsonl", "--method", "ppo"],
    ["{fixtures}/text.jsonl", "--format", "csv"],
    ["{fixtures}"],  # a directory without a train file
])
def test_usage_errors_exit_2(cli, args):
    result = cli(*[a.format(fixtures=FIXTURES) for a in args])
    assert result.exit_code == 2, result.output


# -- one entry point, the service's settings, a quick start ----------------------------------


def test_the_settings_in_the_environment_apply_as_in_the_service(cli, tmp_path, monkeypatch):
    long = {"instruction": "q" * 200, "output": "a"}
    data = write_jsonl(tmp_path / "d.jsonl", [long, *ROWS])
    assert cli(data).exit_code == 0
    monkeypatch.setenv("TUNEBUS_VALIDATOR__MAX_LINE_BYTES", "100")
    result = cli(data, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["errors"][0]["kind"] == "line_too_long"
    monkeypatch.setenv("TUNEBUS_VALIDATOR__MIN_ROWS", "100")
    assert "fewer than min_rows (100)" in cli(data, "--on-invalid", "drop").stdout


def test_on_invalid_drop_leaves_bad_rows_out_and_says_so(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"instruction": "q"}])
    assert cli(data).exit_code == 1
    result = cli(data, "--on-invalid", "drop")
    assert result.exit_code == 0 and "dropped 1 invalid rows (missing_field 1)" in result.stdout
    report = json.loads(cli(data, "--on-invalid", "drop", "--json").stdout)
    assert (report["invalid_rows"], report["invalid_reasons"]) == (1, {"missing_field": 1})


def test_help_shows_the_limits_and_their_defaults(cli):
    from tunebus.services.dataset_validator.config import ValidatorSettings

    help_text = " ".join(CliRunner().invoke(app, ["validate", "--help"]).stdout.split())
    for name in ("max_bytes", "max_rows", "max_line_bytes", "max_depth", "min_rows"):
        default = ValidatorSettings.model_fields[name].default
        assert f"TUNEBUS_VALIDATOR__{name.upper()} ({default}" in help_text


def test_the_commands_choices_are_the_contracts():
    from typing import get_args

    from tunebus.contracts import training
    from tunebus.shared.cli import validate

    for name in ("Method", "DatasetFormat", "OnInvalid"):
        assert get_args(getattr(validate, name)) == get_args(getattr(training, name))


def test_a_local_check_loads_neither_the_contracts_nor_pydantic_settings(tmp_path):
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code = ("import sys; sys.argv = ['tunebus', 'validate', sys.argv[1]]\n"
            "from tunebus.shared.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, [m for m in ('tunebus.contracts', 'pydantic_settings', 'minio', "
            "'faststream') if m in sys.modules])")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.upper().startswith("TUNEBUS_VALIDATOR__")}
    out = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "0 []"
