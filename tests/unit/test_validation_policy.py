"""What to do with bad rows (a request's dataset.on_invalid), the fewest rows a dataset may keep,
and the one validation policy the service, its request/reply check and `tunebus validate` share."""

from __future__ import annotations

import io
import json

from tunebus.contracts.dataset import DatasetReport
from tunebus.services.dataset_validator.config import ValidatorSettings
from tunebus.services.dataset_validator.summary import dataset_report
from tunebus.services.dataset_validator.validation import Policy, validate

GOOD = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]


def run(lines: list, **kwargs):
    data = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    out = io.BytesIO()
    report = validate([("d.jsonl", io.BytesIO(data.encode()))], train_sink=out, valid_sink=out,
                      **kwargs)
    return report, [json.loads(x) for x in out.getvalue().splitlines()]


MIXED = [*GOOD[:3], "{not json\n", {"instruction": "q", "output": 3},
         {"instruction": "", "output": "x", "input": 5}, *GOOD[3:]]


def test_reject_is_the_default_and_any_bad_row_rejects():
    report, _ = run(MIXED)
    assert not report.valid and report.error_count == 4 and report.invalid_rows == 0


def test_drop_leaves_bad_rows_out_and_counts_them_by_their_first_error():
    report, rows = run(MIXED, on_invalid="drop")
    assert report.valid and report.error_count == 0 and len(rows) == 8
    assert report.invalid_rows == 3
    assert report.invalid_reasons == {"invalid_json": 1, "wrong_type": 2}  # row 6 has two errors
    assert report.warning_counts_by_kind == {"invalid_row": 4}  # each error is still told
    assert report.warnings[0].startswith("d.jsonl line 4: invalid JSON")
    assert "row dropped" in report.warnings[0]


def test_too_few_rows_left_is_still_a_rejection():
    report, _ = run(MIXED, on_invalid="drop", min_rows=9)
    assert not report.valid and [e.kind for e in report.errors] == ["too_few_rows"]
    assert "8 rows left, fewer than min_rows (9)" in report.reason
    assert "invalid (wrong_type): 2" in report.reason
    report, _ = run(["{bad\n"] * 3, on_invalid="drop")
    assert [e.kind for e in report.errors] == ["no_rows"]


def test_drop_does_not_drop_what_is_wrong_with_the_whole_dataset():
    report, _ = run([*GOOD, {"text": "plain"}], on_invalid="drop")
    assert not report.valid and "mixed_format" in report.error_counts_by_kind
    array = io.BytesIO(b'[{"instruction": "q", "output": "a"}, {"instruction": "r", "output"')
    report = validate([("d.json", array)], on_invalid="drop")
    assert not report.valid and report.error_counts_by_kind == {"invalid_json": 1}


def test_the_policy_defaults_are_the_settings_defaults():
    assert ValidatorSettings().policy() == Policy()


def test_the_policy_applies_the_settings():
    policy = ValidatorSettings(max_line_bytes=64, min_rows=2, max_errors=5).policy()
    long = {"instruction": "q" * 100, "output": "a"}
    report = policy.validate([("d.jsonl", io.BytesIO((json.dumps(long) + "\n").encode()))])
    assert [e.kind for e in report.errors] == ["line_too_long"]


def test_the_report_fields_are_the_contracts():
    report, _ = run(MIXED, on_invalid="drop")
    fields = report.contract_fields()
    assert list(fields) == list(DatasetReport.model_fields)
    assert DatasetReport.model_validate(fields) == dataset_report(report)
    assert dataset_report(report).invalid_reasons == {"invalid_json": 1, "wrong_type": 2}
