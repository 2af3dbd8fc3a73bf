"""Properties of the validator that examples alone would not pin down: the fast path never
disagrees with the full check, the chunk size never changes a verdict, and JSONL and JSON
arrays holding the same rows come out the same."""

from __future__ import annotations

import gzip
import io
import json

import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunebus.services.dataset_validator import reading
from tunebus.services.dataset_validator.formats import FORMATS, chars_of, detect
from tunebus.services.dataset_validator.validation import Limits, validate

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "\t ", "\u3000", "ok", "[{", "\\", '"', "é", "\u2028"]),
)
maybe_null = st.one_of(st.none(), texts)
odd_values = st.one_of(st.none(), st.integers(), st.booleans(), texts,
                       st.lists(texts, max_size=2), st.dictionaries(texts, texts, max_size=2))
other_keys = st.dictionaries(
    st.sampled_from(["messages", "conversations", "instruction", "output", "chosen", "rejected",
                     "preferred_output", "history", "tools", "text", "answer", "id", "meta"]),
    odd_values, max_size=2,
)


def turn_list(role_key: str, content_key: str, roles: list[str]):
    weights = st.one_of(st.none(), st.sampled_from([0, 1, 2, True, 0.5, "1"]))
    turn = st.fixed_dictionaries({role_key: st.sampled_from(roles), content_key: texts},
                                 optional={"tool_calls": st.none(), "name": texts,
                                           "weight": weights})
    return st.lists(turn, max_size=5)


rows = {
    "alpaca": st.fixed_dictionaries(
        {"instruction": texts, "output": texts},
        optional={"input": maybe_null, "system": maybe_null, "history": st.none()}),
    "messages": st.fixed_dictionaries(
        {"messages": turn_list("role", "content", ["system", "user", "assistant", "tool", "x"])},
        optional={"tools": st.none()}),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": turn_list("from", "value", ["human", "gpt", "system", "observation"])},
        optional={"system": maybe_null, "tools": st.none()}),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(sorted(rows)), extra=other_keys)
def test_the_fast_path_only_takes_rows_the_full_check_passes_cleanly_and_writes_the_same_bytes(
        data, fmt, extra):
    row = {**extra, **data.draw(rows[fmt])} if data.draw(st.booleans()) else {**data.draw(rows[fmt]), **extra}
    line = json.dumps(row, ensure_ascii=data.draw(st.booleans())).encode()
    got = FORMATS[fmt].fast()(line)
    if got is None:
        return
    decoded = json.loads(line)
    normalized, problems, warnings = FORMATS[fmt].normalize(decoded)
    assert detect(decoded) == [fmt]
    assert not problems and not warnings
    assert got == (msgspec.json.encode(normalized) + b"\n", chars_of(FORMATS[fmt].kind, normalized))


def outcome(data: bytes, **kwargs) -> tuple:
    out = io.BytesIO()
    report = validate([("f", io.BytesIO(data))], train_sink=out, valid_sink=out,
                      limits=Limits(max_line_bytes=200, max_depth=6), max_errors=1000, **kwargs)
    errors = [(e.line, e.index, e.field, e.kind, e.message) for e in report.errors]
    return report.valid, errors, report.warnings, report.rows, out.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)
good_rows = st.one_of(rows["alpaca"], rows["messages"])
files = st.one_of(
    st.lists(st.one_of(good_rows, json_values), max_size=8).map(
        lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()),
    st.lists(st.one_of(good_rows, json_values), max_size=8).map(lambda rs: json.dumps(rs).encode()),
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b",", b"\n", b"\r\n", b" ",
                              b'{"instruction": "a", "output": "b"}', b"null", b"\xef\xbb\xbf"]),
             max_size=40).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(data=files, chunk=st.integers(3, 40))
def test_the_chunk_size_never_changes_the_outcome(data, chunk):
    expected = outcome(data)
    saved = reading.CHUNK
    reading.CHUNK = chunk
    try:
        assert outcome(data) == expected
    finally:
        reading.CHUNK = saved


@settings(max_examples=200, deadline=None)
@given(rs=st.lists(st.one_of(good_rows, json_values), min_size=1, max_size=8))
def test_jsonl_and_a_json_array_of_the_same_rows_give_the_same_rows_and_error_kinds(rs):
    assume(isinstance(rs[0], dict))  # a JSONL file whose first line is an array reads as one
    as_lines = outcome("".join(json.dumps(r) + "\n" for r in rs).encode())
    as_array = outcome(json.dumps(rs).encode())
    assert as_lines[0] == as_array[0] and as_lines[3] == as_array[3]
    assert [e[2:4] for e in as_lines[1]] == [e[2:4] for e in as_array[1]]
    assert as_lines[4] == as_array[4]


@settings(max_examples=200, deadline=None)
@given(rs=st.lists(good_rows, min_size=1, max_size=6), cut=st.floats(0, 1),
       array=st.booleans(), compress=st.booleans())
def test_a_truncated_file_always_gets_a_verdict(rs, cut, array, compress):
    whole = json.dumps(rs).encode() if array else "".join(json.dumps(r) + "\n" for r in rs).encode()
    if compress:
        whole = gzip.compress(whole)
    part = whole[: int(len(whole) * cut)]
    valid, errors, _, _, _ = outcome(part)
    assert valid == (not errors)
