"""Parquet input (the `parquet` extra): read by pyarrow a row group at a time, each row held to the
same rules as a JSON row, errors located by row index."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from tunebus.services.dataset_validator.validation import Limits, validate

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def parquet(rows: list[dict], row_group_size: int = 3) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out, row_group_size=row_group_size)
    return out.getvalue()


def check(data: bytes, name: str = "d.parquet", **kwargs):
    out = io.BytesIO()
    report = validate([(name, io.BytesIO(data))], train_sink=out, valid_sink=out,
                      valid_fraction=0.0, **kwargs)
    return report, out.getvalue()


CHAT = [{"messages": [{"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]


def test_rows_of_every_row_group_become_the_same_canonical_rows_as_jsonl():
    data = parquet(CHAT)
    report, out = check(data)
    assert report.valid and report.rows == 10 and report.format == "messages"
    jsonl = "".join(json.dumps(r) + "\n" for r in CHAT).encode()
    assert out == check(jsonl, "d.jsonl")[1]
    assert report.sha256 == {"d.parquet": hashlib.sha256(data).hexdigest()}


def test_bad_rows_are_named_by_row_index_and_field():
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    rows[4]["output"] = ""
    rows[2]["instruction"] = ""
    report, _ = check(parquet(rows))
    assert [(e.index, e.line, e.field, e.kind) for e in report.errors] == [
        (2, None, "instruction", "empty_value")]
    assert "d.parquet index 4: empty assistant output" in report.warnings
    assert str(report.errors[0]).startswith("d.parquet index 2: instruction:")


def test_struct_columns_unified_by_arrow_read_as_absent_fields():
    # Arrow gives every row every key its column has: null where a row had none.
    rows = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "weight": 0},
                          {"role": "user", "content": "r"},
                          {"role": "assistant", "content": "b", "weight": 1}]}, *CHAT[:3]]
    report, out = check(parquet(rows))
    assert report.valid, report.errors
    answers = [json.loads(line)["messages"][1] for line in out.splitlines()]
    assert {"role": "assistant", "content": "a", "weight": 0} in answers
    assert {"role": "assistant", "content": "a0"} in answers


def test_the_limits_hold_for_parquet_rows():
    rows = [{"text": "x" * 200}, {"text": "short"}]
    report, _ = check(parquet(rows), limits=Limits(max_line_bytes=100))
    assert [(e.index, e.kind) for e in report.errors] == [(0, "line_too_long")]
    report, _ = check(parquet(CHAT), limits=Limits(max_bytes=200))
    assert report.error_counts_by_kind == {"too_many_bytes": 1}


def test_a_damaged_parquet_file_is_a_clear_error():
    data = parquet(CHAT)
    report, _ = check(data[: len(data) // 2])
    assert [e.kind for e in report.errors] == ["invalid_parquet"]


def test_a_directory_of_hugging_face_shards_is_read_shard_by_shard(tmp_path):
    from tunebus.services.dataset_validator.layout import DatasetUnavailable, split_files

    names = ["train-00001-of-00002.parquet", "README.md", "train-00000-of-00002.parquet",
             "test-00000-of-00001.parquet"]
    assert split_files("d", names) == [("train-00000-of-00002.parquet", "auto"),
                                       ("train-00001-of-00002.parquet", "auto"),
                                       ("test-00000-of-00001.parquet", "test")]
    with pytest.raises(DatasetUnavailable, match="not a whole set"):
        split_files("d", names[:2])
    with pytest.raises(DatasetUnavailable, match="both train.parquet and train shards"):
        split_files("d", [*names, "train.parquet"])


def test_tunebus_validate_reads_a_directory_of_shards(tmp_path):
    from typer.testing import CliRunner

    from tunebus.shared.cli import app

    for i, part in enumerate((CHAT[:5], CHAT[5:])):
        (tmp_path / f"train-0000{i}-of-00002.parquet").write_bytes(parquet(part))
    result = CliRunner().invoke(app, ["validate", str(tmp_path), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["rows"] == 10
