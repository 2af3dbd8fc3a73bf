"""The dataset validator's streaming core: encodings, error locations, limits, the split and
duplicates. (Each format: test_validation_formats.py; properties: test_validation_properties.py.)"""

from __future__ import annotations

import gzip
import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tunebus.services.dataset_validator import reading
from tunebus.services.dataset_validator.formats import FORMATS, METHOD_FORMATS
from tunebus.services.dataset_validator.refining import DigestSet, LengthStats
from tunebus.services.dataset_validator.tokens import load_tokenizer
from tunebus.services.dataset_validator.validation import (
    Limits,
    Refinement,
    Source,
    ValidationReport,
    validate,
)

ALPACA = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]
MESSAGES = [
    {"messages": [{"role": "user", "content": f"hi {i}"},
                  {"role": "assistant", "content": "hello"}]}
    for i in range(10)
]


def jsonl(rows: list, newline: str = "\n") -> bytes:
    return "".join(json.dumps(r) + newline for r in rows).encode()


def run(data: bytes, name: str = "data.jsonl", **kwargs) -> ValidationReport:
    return validate([(name, io.BytesIO(data))], **kwargs)


def run_with_sinks(data: bytes, **kwargs) -> tuple[ValidationReport, list[dict], list[dict]]:
    train, valid = io.BytesIO(), io.BytesIO()
    report = run(data, train_sink=train, valid_sink=valid, **kwargs)
    parse = lambda sink: [json.loads(line) for line in sink.getvalue().splitlines()]  # noqa: E731
    return report, parse(train), parse(valid)


def where(report: ValidationReport) -> list[tuple]:
    return [(e.line, e.index, e.field, e.kind) for e in report.errors]


# -- formats and encodings -------------------------------------------------------------------


def test_alpaca_jsonl_is_normalised_to_messages():
    rows = [{"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Be brief"}]
    rows += ALPACA
    report, train, valid = run_with_sinks(jsonl(rows))
    assert report.valid and report.format == "alpaca"
    assert report.rows == 11 and report.train_rows + report.valid_rows == 11
    assert report.sample_preview[0] == {"messages": [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Add\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]}
    assert {"messages": [{"role": "user", "content": "question 0"},
                         {"role": "assistant", "content": "answer 0"}]} in train + valid


def test_messages_jsonl_is_accepted_and_extra_keys_are_dropped():
    rows = [{"messages": [{"role": "system", "content": "s", "name": "x"},
                          {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}], "id": 7}] + MESSAGES
    report, train, valid = run_with_sinks(jsonl(rows))
    assert report.valid and report.format == "messages" and report.rows == 11
    assert report.sample_preview[0] == {"messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]}
    assert len(train) + len(valid) == 11


def test_json_array_is_accepted():
    report = run(json.dumps(ALPACA, indent=2).encode(), name="data.json")
    assert report.valid and report.rows == 10 and report.format == "alpaca"


def test_json_array_errors_are_reported_by_index():
    rows = [ALPACA[0], {"instruction": "x", "output": 5}, ALPACA[1]]
    report = run(json.dumps(rows).encode(), name="data.json")
    assert not report.valid
    assert where(report) == [(None, 1, "output", "wrong_type")]
    assert "index 1" in str(report.errors[0])


def test_json_array_syntax_error_names_the_index():
    report = run(b'[{"instruction": "a", "output": "b"},\n {"instruction": }]', name="d.json")
    assert where(report) == [(None, 1, None, "invalid_json")]
    assert "line 2" in report.errors[0].message


def test_gzip_is_detected_by_magic_bytes_not_name():
    data = gzip.compress(jsonl(ALPACA))
    report = run(data, name="data.jsonl")
    assert report.valid and report.rows == 10
    assert report.sha256["data.jsonl"] == __import__("hashlib").sha256(data).hexdigest()


def test_corrupt_gzip_is_an_error_not_a_crash():
    data = gzip.compress(jsonl(ALPACA))
    report = run(data[: len(data) // 2])
    assert not report.valid and "invalid_gzip" in report.error_counts_by_kind


def test_utf8_bom_is_accepted_in_jsonl_and_arrays():
    assert run(b"\xef\xbb\xbf" + jsonl(ALPACA)).valid
    assert run(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode()).valid


def test_crlf_line_endings_and_blank_lines_are_accepted():
    data = jsonl(ALPACA[:3], newline="\r\n") + b"\r\n\r\n" + jsonl(ALPACA[3:], newline="\r\n")
    report = run(data)
    assert report.valid and report.rows == 10


def test_line_numbers_count_blank_lines():
    data = b"\n" + jsonl(ALPACA[:2]) + b"\n" + b'{"instruction": "x"}\n'
    assert where(run(data)) == [(5, None, "output", "missing_field")]


def test_invalid_utf8_is_reported_on_its_line():
    data = jsonl(ALPACA[:2]) + b'{"instruction": "\xff", "output": "x"}\n'
    assert where(run(data)) == [(3, None, None, "invalid_utf8")]


# -- format detection ------------------------------------------------------------------------


def test_auto_detects_each_format():
    assert run(jsonl(ALPACA)).format == "alpaca"
    assert run(jsonl(MESSAGES)).format == "messages"


def test_forced_format_rejects_rows_of_the_other_format():
    report = run(jsonl(MESSAGES[:3]), format="alpaca")
    assert not report.valid and report.error_counts_by_kind == {"format_mismatch": 3}
    assert "messages format" in report.errors[0].message


def test_forced_format_names_missing_fields_of_unrecognised_rows():
    report = run(jsonl([{"question": "p", "response": "c"}]), format="alpaca")
    assert where(report) == [(1, None, "instruction", "missing_field"),
                             (1, None, "output", "missing_field")]


def test_mixed_format_file_is_rejected_naming_lines():
    rows = ALPACA[:2] + MESSAGES[:1] + ALPACA[2:3] + MESSAGES[1:2]
    report = run(jsonl(rows))
    assert not report.valid
    summary, *per_row = report.errors
    assert "alpaca on 3 rows (first at data.jsonl line 1)" in summary.message
    assert "messages on 2 rows (first at data.jsonl line 3)" in summary.message
    assert [(e.line, e.kind) for e in per_row] == [(3, "mixed_format"), (5, "mixed_format")]


def test_row_matching_no_format_names_what_is_missing():
    report = run(jsonl([{"question": "p", "response": "c"}]))
    [error] = report.errors
    assert error.kind == "unknown_format" and error.line == 1
    assert "'messages'" in error.message and "'instruction'" in error.message
    assert "'question'" in error.message


def test_row_matching_no_format_lists_only_what_the_method_takes():
    [error] = run(jsonl([{"question": "p", "response": "c"}]), method="dpo").errors
    assert "'chosen'" in error.message and "'instruction'" not in error.message


# -- row errors ------------------------------------------------------------------------------


def test_invalid_json_on_line_3_is_reported_as_line_3():
    data = jsonl(ALPACA[:2]) + b'{"instruction": "a" "output": "b"}\n' + jsonl(ALPACA[2:])
    report = run(data)
    [error] = report.errors
    assert (error.file, error.line, error.field) == ("data.jsonl", 3, None)
    assert error.message == "invalid JSON: Expecting ',' delimiter at column 21"


def test_wrong_types_are_reported_with_field_paths():
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, "oops"]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": []},
        {"messages": [{"role": "", "content": "q"}, {"role": "assistant"}]},
    ]
    report = run(jsonl(rows))
    assert where(report) == [
        (1, None, "messages[1].content", "wrong_type"),
        (2, None, "messages[0].role", "invalid_value"),
        (3, None, "messages[1]", "wrong_type"),
        (4, None, "messages", "wrong_type"),
        (5, None, "messages", "no_assistant"),  # an error since issue 12 (a warning before)
        (6, None, "messages", "empty_value"),
        (7, None, "messages[0].role", "invalid_value"),
        (7, None, "messages[1].content", "missing_field"),
    ]
    assert report.errors[0].message == "expected a string, got int"
    assert "'robot'" in report.errors[1].message


def test_alpaca_field_rules():
    rows = [
        {"instruction": "", "output": "x"},
        {"instruction": "q", "output": None},
        {"instruction": "q", "output": "a", "input": None, "system": None},  # nulls are absent
        {"instruction": "q", "output": "a", "input": 3},
    ]
    assert where(run(jsonl(rows))) == [
        (1, None, "instruction", "empty_value"),
        (2, None, "output", "wrong_type"),
        (4, None, "input", "wrong_type"),
    ]


def test_every_row_is_checked():
    rows = list(ALPACA[:6])
    rows[1] = {"instruction": "q"}
    rows[4] = {"instruction": "q", "output": ["a"]}
    assert [(e.line, e.field) for e in run(jsonl(rows)).errors] == [(2, "output"), (5, "output")]


def test_errors_are_capped_but_counted_in_full():
    report = run(b"nope\n" * 120 + jsonl(ALPACA), max_errors=5)
    assert len(report.errors) == 5 and report.error_count == 120
    assert report.error_counts_by_kind == {"invalid_json": 120}


def test_empty_dataset_is_invalid():
    for data in (b"", b"\n\n", b"[]", gzip.compress(b"")):
        report = run(data)
        assert not report.valid and report.error_counts_by_kind == {"no_rows": 1}


# -- limits ----------------------------------------------------------------------------------


def test_max_bytes_stops_reading_with_a_clear_error():
    report = run(jsonl(ALPACA * 100), limits=Limits(max_bytes=1000))
    assert not report.valid and report.error_counts_by_kind == {"too_many_bytes": 1}
    assert "max_bytes" in report.errors[0].message
    assert report.sha256["data.jsonl"] is None


def test_max_bytes_bounds_decompressed_size_of_gzip():
    bomb = gzip.compress(b"\n" * 10_000_000)
    report = run(bomb, limits=Limits(max_bytes=100_000))
    assert report.error_counts_by_kind == {"too_many_bytes": 1}


def test_max_bytes_applies_to_json_arrays():
    report = run(json.dumps(ALPACA * 100).encode(), limits=Limits(max_bytes=1000))
    assert report.error_counts_by_kind == {"too_many_bytes": 1}


def test_max_rows_stops_reading_with_a_clear_error():
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(20)]
    report = run(jsonl(rows), limits=Limits(max_rows=5))
    assert report.rows == 5 and report.error_counts_by_kind == {"too_many_rows": 1}
    assert report.errors[0].line == 6


def test_long_line_is_an_error_and_the_next_line_is_still_checked():
    long_row = json.dumps({"instruction": "x" * 5000, "output": "a"}).encode() + b"\n"
    data = jsonl(ALPACA[:1]) + long_row + b'{"instruction": "q"}\n'
    report = run(data, limits=Limits(max_line_bytes=1000))
    assert where(report) == [(2, None, None, "line_too_long"), (3, None, "output", "missing_field")]


def test_line_exactly_at_the_limit_is_accepted():
    row = json.dumps({"instruction": "q", "output": "a"}).encode()
    assert run(row + b"\r\n", limits=Limits(max_line_bytes=len(row))).valid
    assert run(row + b"\r\n", limits=Limits(max_line_bytes=len(row) - 1)).error_counts_by_kind == {
        "line_too_long": 1}


def test_max_depth_is_a_row_error():
    deep = {"instruction": "q", "output": "a", "meta": [[[[["x"]]]]]}
    report = run(jsonl([deep, ALPACA[0]]), limits=Limits(max_depth=4))
    assert where(report) == [(1, None, None, "too_deep")]
    brackets_in_strings = {"instruction": "[[[[[[[[", "output": "{{{{{{{{"}
    assert run(jsonl([brackets_in_strings]), limits=Limits(max_depth=4)).valid


def test_nesting_beyond_the_interpreter_recursion_limit_is_too_deep():
    # An array file: its first element is too deep, and the array is never closed either.
    assert run(b"[" * 100_000 + b"\n").error_counts_by_kind == {"too_deep": 1, "invalid_json": 1}
    assert run(b'{"a":' * 100_000 + b"\n").error_counts_by_kind == {"too_deep": 1}


# -- split and duplicates --------------------------------------------------------------------


ROWS_200 = [{"instruction": f"question {i}", "output": "answer"} for i in range(200)]


def test_split_is_deterministic_for_a_seed_and_changes_with_the_seed():
    _, train_a, valid_a = run_with_sinks(jsonl(ROWS_200), seed=1)
    _, train_b, valid_b = run_with_sinks(jsonl(ROWS_200), seed=1)
    _, train_c, valid_c = run_with_sinks(jsonl(ROWS_200), seed=2)
    assert (train_a, valid_a) == (train_b, valid_b)
    assert valid_a != valid_c
    assert len(train_a) + len(valid_a) == 200
    assert 5 <= len(valid_a) <= 40  # about valid_fraction=0.1


def test_split_keeps_a_row_with_the_same_side_whatever_comes_around_it():
    _, _, valid_full = run_with_sinks(jsonl(ROWS_200), seed=3)
    _, _, valid_half = run_with_sinks(jsonl(ROWS_200[:100]), seed=3)
    assert valid_half == [r for r in valid_full if r in valid_half] and valid_half


def test_the_inline_loop_of_later_batches_agrees_with_the_per_row_path(monkeypatch):
    """With 1 MiB chunks these rows are one batch, handled row by row; with 200-byte chunks the
    later batches run the inline loop (preview full, both splits started)."""
    rows = ROWS_200 + ROWS_200[:20] + [{"instruction": "long " * 40, "output": "x"}]
    whole = run_with_sinks(jsonl(rows), seed=5, max_seq_length=20)
    monkeypatch.setattr(reading, "CHUNK", 200)
    chunked = run_with_sinks(jsonl(rows), seed=5, max_seq_length=20)
    assert chunked == whole
    report, train, valid = chunked
    assert report.dropped_reasons == {"duplicate": 20} and len(train) + len(valid) == 201
    assert report.warning_counts_by_kind == {"duplicate": 20, "longer_than_max_seq_length": 1}


def test_small_dataset_gets_a_row_in_each_split():
    for n in (2, 3, 5):
        report, train, valid = run_with_sinks(jsonl(ALPACA[:n]))
        assert report.valid and len(train) >= 1 and len(valid) >= 1
        assert (report.train_rows, report.valid_rows) == (len(train), len(valid))
        assert len(train) + len(valid) == n
    report, train, valid = run_with_sinks(jsonl(ALPACA[:3]), valid_fraction=1.0)
    assert len(train) == 1 and len(valid) == 2


def test_single_row_goes_to_one_split():
    report, train, valid = run_with_sinks(jsonl(ALPACA[:1]))
    assert report.valid and len(train) + len(valid) == 1


def test_duplicates_are_dropped_with_a_warning_even_across_files():
    report = validate([("a.jsonl", io.BytesIO(jsonl(ALPACA + ALPACA[:3]))),
                       ("b.jsonl", io.BytesIO(jsonl(ALPACA[:1])))], format="alpaca")
    assert report.valid and report.dropped == 4
    assert report.train_rows + report.valid_rows == 10
    assert report.warnings[0] == "a.jsonl line 11: duplicate of an earlier row, dropped"
    assert run(jsonl(MESSAGES[:1] * 3)).dropped == 2


def test_empty_assistant_output_is_a_warning():
    report = run(jsonl([{"instruction": "q", "output": ""}, ALPACA[0]]))
    assert report.valid and report.warnings == ["data.jsonl line 1: empty assistant output"]


def test_report_is_json_serialisable():
    report = run(jsonl(ALPACA[:2]) + b"bad\n")
    encoded = json.loads(json.dumps(report.to_dict()))
    assert encoded["errors"][0] == {"file": "data.jsonl", "line": 3, "index": None, "field": None,
                                    "message": encoded["errors"][0]["message"],
                                    "kind": "invalid_json"}


# -- JSON arrays, streamed -------------------------------------------------------------------


def test_array_element_longer_than_the_limit_is_skipped_and_the_next_is_checked():
    rows = [ALPACA[0], {"instruction": "x" * 5000, "output": "a"}, {"instruction": "q"}]
    report = run(json.dumps(rows).encode(), name="d.json", limits=Limits(max_line_bytes=1000))
    assert where(report) == [(None, 1, None, "line_too_long"), (None, 2, "output", "missing_field")]


def test_array_syntax_errors_say_where():
    for data, message in [
        (b'[{"instruction": "a", "output": "b"} {"x": 1}]', "expected ',' or ']' after the element"),
        (b'[{"instruction": "a", "output": "b"},]', "expected a value"),
        (b'[{"instruction": "a", "output": "b"}] {}', "extra data after the array"),
        (b'[{"instruction": "a", "output": "b"},\n {"instruction": "c"', "ends inside element 1"),
    ]:
        report = run(data, name="d.json")
        assert not report.valid and report.errors[-1].kind == "invalid_json", data
        assert message in report.errors[-1].message, (data, report.errors)


def test_array_element_too_deep_is_found_while_scanning():
    rows = [{"instruction": "q", "output": "a", "meta": [[[[["x"]]]]]}, ALPACA[0]]
    report = run(json.dumps(rows).encode(), name="d.json", limits=Limits(max_depth=4))
    assert where(report) == [(None, 0, None, "too_deep")] and report.train_rows + report.valid_rows == 1


# -- given splits, refinement, lengths -------------------------------------------------------


def split_outputs(sources: list[Source], **kwargs):
    sinks = {name: io.BytesIO() for name in ("train", "valid", "test")}
    report = validate(sources, train_sink=sinks["train"], valid_sink=sinks["valid"],
                      test_sink=sinks["test"], **kwargs)
    return report, {k: [json.loads(x) for x in v.getvalue().splitlines()] for k, v in sinks.items()}


def test_a_given_valid_file_is_kept_as_it_is_and_overlap_is_a_warning():
    train = ALPACA[:6] + ALPACA[:1]
    valid = ALPACA[6:] + ALPACA[6:7] + ALPACA[:1]  # a repeat, and a row also in train
    report, out = split_outputs([Source("train.jsonl", io.BytesIO(jsonl(train)), "train"),
                                 Source("valid.jsonl", io.BytesIO(jsonl(valid)), "valid"),
                                 Source("test.jsonl", io.BytesIO(jsonl(ALPACA[:2])), "test")])
    assert report.valid
    assert (report.train_rows, report.valid_rows, report.test_rows) == (6, 6, 2)
    assert (len(out["train"]), len(out["valid"]), len(out["test"])) == (6, 6, 2)
    assert report.dropped_reasons == {"duplicate": 1}
    assert report.warning_counts_by_kind == {"duplicate": 1, "in_training_data": 3}
    assert "valid.jsonl line 6: also in the training data" in report.warnings
    assert report.rows_by_file == {"train.jsonl": 7, "valid.jsonl": 6, "test.jsonl": 2}


def test_length_filters_drop_rows_with_the_reason():
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "question", "output": "answer" * 20},
            {"instruction": "medium", "output": "length"}]
    report, train, valid = run_with_sinks(jsonl(rows), refinement=Refinement(min_chars=5, max_chars=50))
    assert report.valid and report.dropped_reasons == {"too_short": 1, "too_long": 1}
    assert len(train) + len(valid) == 1 and report.dropped == 2


def test_duplicates_are_kept_when_dedupe_is_off():
    report, train, valid = run_with_sinks(jsonl(ALPACA[:2] * 3), refinement=Refinement(dedupe=False))
    assert report.valid and report.dropped == 0 and len(train) + len(valid) == 6


def test_a_dataset_whose_rows_are_all_dropped_is_invalid():
    report = run(jsonl(ALPACA), refinement=Refinement(min_chars=1000))
    assert not report.valid and report.error_counts_by_kind == {"no_rows": 1}
    assert "all 10 were dropped (too_short: 10)" in report.reason


def test_token_statistics_estimate_and_max_seq_length_warning():
    rows = [{"instruction": "q" * 40, "output": "a" * 40} for _ in range(1)] + \
           [{"instruction": f"{i:02d}", "output": "ab"} for i in range(19)]
    report = run(jsonl(rows), max_seq_length=10)
    assert report.token_stats == {"min": 1.0, "mean": 1.95, "p50": 1.0, "p95": 1.0, "max": 20.0}
    assert report.token_counter == "estimate: characters / 4"
    assert report.warnings == ["data.jsonl line 1: about 20 tokens, longer than max_seq_length "
                               "(10): training truncates it"]


def test_token_lengths_come_from_the_tokenizer_when_there_is_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "tokenizer.json"))
    tokens = load_tokenizer(tmp_path, "word-model")
    rows = [{"instruction": "one two three", "output": "four five"},
            {"instruction": "a", "output": "b"}]
    report = run(jsonl(rows), tokens=tokens, max_seq_length=3)
    assert report.token_counter == "word-model"
    assert report.token_stats["max"] == 5 and report.token_stats["min"] == 2
    assert report.warnings == ["data.jsonl line 1: 5 tokens, longer than max_seq_length (3): "
                               "training truncates it"]
    assert load_tokenizer(tmp_path / "nowhere", "x") is None


def test_length_percentiles_are_nearest_rank():
    stats = LengthStats()
    for n in [5] * 90 + [100] * 9 + [70_000]:
        stats.add(n)
    assert stats.summary() == {"min": 5.0, "mean": 713.5,
                               "p50": 5.0, "p95": 100.0, "max": 70_000.0}


def test_digest_set_does_not_match_across_two_keys():
    seen = DigestSet()
    bucket = b"\x00\x00"
    assert seen.add(bytes(8) + b"\x00" * 4 + b"\x01" * 4 + bucket)
    assert seen.add(bytes(8) + b"\x02" * 4 + b"\x03" * 4 + bucket)
    straddling = bytes(8) + b"\x01" * 4 + b"\x02" * 4 + bucket
    assert straddling not in seen and seen.add(straddling) and not seen.add(straddling)


def test_progress_is_reported_while_reading():
    calls = []
    run(jsonl(ALPACA), progress=lambda rows, nbytes: calls.append((rows, nbytes)))
    assert calls and calls[-1][0] == 10 and calls[-1][1] == len(jsonl(ALPACA))


# -- never crashes ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["instruction", "input", "output", "system", "messages",
                                       "role", "content", "x"]) | st.text(max_size=5),
                      children, max_size=4),
    max_leaves=20,
)


def deep_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


inputs = st.one_of(
    st.binary(max_size=400),
    st.lists(json_values, max_size=6).map(lambda rows: jsonl(rows)),
    st.lists(json_values, max_size=6).map(lambda rows: json.dumps(rows).encode()),
    st.integers(0, 5000).map(deep_arrays),
    st.integers(0, 5000).map(lambda d: b"[" * d),
    st.binary(max_size=200).map(gzip.compress),
)


@settings(max_examples=200, deadline=None)
@given(data=inputs, forced=st.sampled_from(["auto", *FORMATS]),
       method=st.sampled_from([None, *METHOD_FORMATS]))
def test_any_input_yields_a_report(data: bytes, forced: str, method: str | None):
    train, valid = io.BytesIO(), io.BytesIO()
    report = run(data, format=forced, method=method, train_sink=train, valid_sink=valid,
                 limits=Limits(max_line_bytes=300, max_depth=8), max_errors=3)
    assert isinstance(report, ValidationReport)
    assert len(report.errors) <= 3 and report.error_count >= len(report.errors)
    assert report.valid == (report.error_count == 0)
    json.dumps(report.to_dict())


def test_the_batched_hot_loop_writes_and_says_what_the_row_by_row_one_does(monkeypatch):
    # Many batches (small chunks); preview_rows past the row count keeps every row on emit's
    # row-by-row path.
    monkeypatch.setattr(reading, "CHUNK", 4096)
    rows = [{"instruction": f"q{i % 2100}", "output": "a" * (i % 50 + 1)} for i in range(3000)]
    data = jsonl(rows)

    def outcome(preview_rows: int):
        train, valid = io.BytesIO(), io.BytesIO()
        report = validate([("d.jsonl", io.BytesIO(data))], train_sink=train, valid_sink=valid,
                          preview_rows=preview_rows, max_errors=10_000)
        return (train.getvalue(), valid.getvalue(), report.dropped_reasons, report.warnings,
                report.token_stats, report.train_rows, report.valid_rows)

    batched, row_by_row = outcome(0), outcome(10_000)
    assert batched == row_by_row
    assert batched[2] == {"duplicate": 900} and batched[3][0].startswith("d.jsonl line 2101:")
