"""Check an uploaded fine-tuning dataset and normalise it, one row at a time.

`validate` reads each file as a stream, checks every row, and writes the rows that pass to a
train sink and a valid sink as chat JSONL (`{"messages": [{"role", "content"}, ...]}`). Memory
stays flat in the size of the input: a JSONL line is held only while it is checked, and a line
longer than the limit is skipped, never buffered. Two things grow with the data, by design:
a JSON array is loaded whole (it has no line boundaries to stream on; `max_bytes` bounds it), and
duplicate detection keeps a 16-byte digest per unique row (about 100 bytes per row in a set).

Where an error points:
  * a JSONL row has `line`, the 1-based physical line in the (decompressed) file;
  * a JSON-array row has `index`, the 0-based position in the array, and `line` is None;
  * a problem with a whole file or the whole dataset has neither.

Limits: going over max_bytes or max_rows stops reading (that file's sha256 is then None);
a line over max_line_bytes or a row nested deeper than max_depth is an error for that row only.

Rows in a dataset must all be one format. In `format="auto"` the first recognised row decides it,
every row in the other format is an error, and a summary error says how many rows of each format
were seen and where each first appeared.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Iterable, Literal, TextIO

Format = Literal["auto", "alpaca", "messages"]


@dataclass(frozen=True)
class Limits:
    """Bounds that turn hostile or runaway input into a rejection instead of an outage."""

    max_bytes: int = 1 << 30  # decompressed bytes, all files together
    max_rows: int = 10_000_000  # rows, all files together
    max_line_bytes: int = 1 << 20  # one JSONL line, not counting its line ending
    max_depth: int = 32  # JSON nesting of one row; the row object itself is depth 1


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem, located (see the module docstring for `line` versus `index`)."""

    file: str | None
    line: int | None
    index: int | None
    field: str | None  # path inside the row, e.g. "messages[2].role"; None for the whole row
    message: str
    kind: str  # stable name for counting, e.g. "invalid_json", "wrong_type", "too_deep"

    def __str__(self) -> str:
        where = _where(self.file, self.line, self.index)
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"


@dataclass
class ValidationReport:
    valid: bool
    format: str | None  # "alpaca" or "messages": the input format; output is always messages
    rows: int  # rows read (non-blank JSONL lines and array elements), good or bad
    train_rows: int
    valid_rows: int
    dropped: int  # good rows not written because they duplicate an earlier row
    errors: list[RowError]  # the first max_errors
    error_count: int  # all of them
    error_counts_by_kind: dict[str, int]
    warnings: list[str]  # the first max_errors
    warning_count: int
    sha256: dict[str, str | None]  # per file, of its bytes as given; None if not read to the end
    sample_preview: list[dict[str, Any]] = field(default_factory=list)  # first 3 output rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(
    files: Iterable[tuple[str, BinaryIO]],
    *,
    format: Format = "auto",
    train_sink: TextIO | None = None,
    valid_sink: TextIO | None = None,
    seed: int = 0,
    valid_fraction: float = 0.1,
    limits: Limits = Limits(),
    max_errors: int = 50,
) -> ValidationReport:
    """Check every row of `files` and split the good ones between the sinks.

    Bad data never raises; it becomes errors in the report. When the report is not valid the
    sinks may hold part of the output, and the caller should discard them.
    """
    if format not in ("auto", "alpaca", "messages"):
        raise ValueError(f"format must be auto, alpaca or messages, not {format!r}")
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be between 0 and 1, not {valid_fraction}")
    run = _Run(format, limits, max_errors, _Splitter(train_sink, valid_sink, seed, valid_fraction))
    for name, stream in files:
        run.read_file(name, stream)
        if run.stopped:
            break
    return run.finish()


class _Splitter:
    """Sends each row to train or valid by a seeded hash of its content, so the split is stable
    and needs no second pass.

    It holds back the latest row of each side. If one side would end up empty while the other
    has two or more rows, the other side's held-back row goes there instead, so any dataset of
    two or more rows has both (valid only when valid_fraction > 0).
    """

    def __init__(self, train: TextIO | None, valid: TextIO | None, seed: int, fraction: float):
        self.key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
        self.threshold = int(fraction * 2**64)  # compared with the digest's first 8 bytes
        self.sinks = (train, valid)
        self.held: list[str | None] = [None, None]
        self.counts = [0, 0]

    def add(self, line: str, digest: bytes) -> None:
        side = 1 if int.from_bytes(digest[:8], "big") < self.threshold else 0
        held = self.held[side]
        if held is not None:
            self._write(side, held)
        self.held[side] = line
        self.counts[side] += 1

    def finish(self) -> None:
        train, valid = self.counts
        if valid == 0 and train >= 2 and self.threshold > 0:
            self._move(0, 1)
        elif train == 0 and valid >= 2:
            self._move(1, 0)
        for side, held in enumerate(self.held):
            if held is not None:
                self._write(side, held)

    def _move(self, src: int, dst: int) -> None:
        self.held[dst], self.held[src] = self.held[src], None
        self.counts[src] -= 1
        self.counts[dst] += 1

    def _write(self, side: int, line: str) -> None:
        sink = self.sinks[side]
        if sink is not None:
            sink.write(line + "\n")


class _Run:
    """The state of one validation: counters, the dedupe set, and what has been said so far."""

    def __init__(self, format: Format, limits: Limits, max_errors: int, splitter: _Splitter):
        self.forced = format != "auto"
        self.format: str | None = None if format == "auto" else format
        self.limits = limits
        self.max_errors = max_errors
        self.splitter = splitter
        self.stopped = False  # a dataset-wide limit was hit; read nothing more
        self.rows = self.bytes_read = self.dropped = 0
        self.errors: list[RowError] = []
        self.error_count = 0
        self.error_counts: dict[str, int] = {}
        self.warnings: list[str] = []
        self.warning_count = 0
        self.seen: set[bytes] = set()
        self.preview: list[dict[str, Any]] = []
        self.sha256: dict[str, str | None] = {}
        self.formats_seen: dict[str, list[Any]] = {}  # format -> [row count, where first seen]

    def read_file(self, name: str, stream: BinaryIO) -> None:
        raw = _HashingReader(stream)
        buffered = io.BufferedReader(raw, 1 << 16)
        try:
            if buffered.peek(2)[:2] == b"\x1f\x8b":
                self._read_rows(name, gzip.GzipFile(fileobj=buffered, mode="rb"))
            else:
                self._read_rows(name, buffered)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            self.error(name, None, None, None, "invalid_gzip", f"cannot decompress: {e}")
        if self.stopped:
            self.sha256[name] = None
        else:
            self.sha256[name] = raw.drain_and_hexdigest()

    def finish(self) -> ValidationReport:
        self.splitter.finish()
        if len(self.formats_seen) > 1 and not self.forced:
            seen = ", ".join(f"{fmt} on {n} row{'s' * (n != 1)} (first at {where})"
                             for fmt, (n, where) in self.formats_seen.items())
            # Listed first: the per-row errors may be capped before they show both formats.
            self.error(None, None, None, None, "mixed_format",
                       f"rows are in mixed formats: {seen}", first=True)
        if self.rows == 0 and not self.stopped:
            self.error(None, None, None, None, "no_rows", "no rows")
        train, valid = self.splitter.counts
        return ValidationReport(
            valid=self.error_count == 0,
            format=self.format,
            rows=self.rows,
            train_rows=train,
            valid_rows=valid,
            dropped=self.dropped,
            errors=self.errors,
            error_count=self.error_count,
            error_counts_by_kind=self.error_counts,
            warnings=self.warnings,
            warning_count=self.warning_count,
            sha256=self.sha256,
            sample_preview=self.preview,
        )

    # -- reading files -------------------------------------------------------------------------

    def _read_rows(self, name: str, data: BinaryIO) -> None:
        """Skip leading blank lines, then read the file as a JSON array if it starts with `[`,
        else as JSONL. The first chunk is read by line so a JSONL file never needs a peek."""
        limit = self.limits.max_line_bytes + 2  # room for "\r\n", so "too long" is detectable
        lineno, first = 1, True
        while True:
            chunk = data.readline(limit)
            if not self._count_bytes(name, len(chunk)) or not chunk:
                return
            if first:
                first = False
                if chunk.startswith(b"\xef\xbb\xbf"):
                    chunk = chunk[3:]
                elif chunk[:2] in (b"\xff\xfe", b"\xfe\xff"):
                    self.error(name, None, None, None, "invalid_utf8",
                               "file is UTF-16 encoded; convert it to UTF-8")
                    return
            stripped = chunk.lstrip(_WS_BYTES)
            if stripped:
                break
            lineno += chunk.endswith(b"\n")
        if stripped.startswith(b"["):
            self._read_array(name, data, chunk)
        else:
            self._read_jsonl(name, data, chunk, lineno)

    def _read_jsonl(self, name: str, data: BinaryIO, chunk: bytes, lineno: int) -> None:
        max_line = self.limits.max_line_bytes
        limit = max_line + 2
        while chunk:
            ending = 2 if chunk.endswith(b"\r\n") else 1 if chunk.endswith(b"\n") else 0
            if len(chunk) - ending > max_line:
                while chunk and not chunk.endswith(b"\n"):  # skip the rest, never hold it
                    chunk = data.readline(limit)
                    if not self._count_bytes(name, len(chunk)):
                        return
                if not self._count_row(name, lineno, None):
                    return
                self.error(name, lineno, None, None, "line_too_long",
                           f"line is longer than max_line_bytes ({max_line} bytes)")
            else:
                line = chunk.strip(_WS_BYTES)
                if line:
                    if not self._count_row(name, lineno, None):
                        return
                    self._jsonl_row(name, lineno, line)
            chunk = data.readline(limit)
            if not self._count_bytes(name, len(chunk)):
                return
            lineno += 1

    def _jsonl_row(self, name: str, lineno: int, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self.error(name, lineno, None, None, "invalid_utf8",
                       f"invalid UTF-8 at byte {e.start + 1}")
            return
        try:
            row = _decode(text)
        except RecursionError:
            self._too_deep(name, lineno, None)
            return
        except ValueError as e:
            self.error(name, lineno, None, None, "invalid_json", _json_message(e))
            return
        max_depth = self.limits.max_depth
        # Counting brackets is a cheap upper bound on depth; walk the row only when it fails.
        if line.count(b"[") + line.count(b"{") > max_depth and _deeper_than(row, max_depth):
            self._too_deep(name, lineno, None)
            return
        self._accept(row, name, lineno, None)

    def _read_array(self, name: str, data: BinaryIO, head: bytes) -> None:
        """A JSON array has no line boundaries to stream on, so it is read whole (within
        max_bytes) and decoded one element at a time. After a syntax error the element
        boundaries are lost, so the rest of the file is not checked."""
        parts = [head]
        while part := data.read(1 << 20):
            if not self._count_bytes(name, len(part)):
                return
            parts.append(part)
        try:
            text = b"".join(parts).decode("utf-8")
        except UnicodeDecodeError as e:
            self.error(name, None, None, None, "invalid_utf8",
                       f"invalid UTF-8 at byte {e.start + 1}")
            return
        del parts
        max_depth = self.limits.max_depth
        pos = _skip_ws(text, _skip_ws(text, 0) + 1)  # just past the opening "["
        index = 0
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                if not self._count_row(name, None, index):
                    return
                try:
                    row, end = _DECODER.raw_decode(text, pos)
                except RecursionError:
                    self._too_deep(name, None, index)
                    return
                except ValueError as e:
                    self.error(name, None, index, None, "invalid_json",
                               _json_message(e, lines=True))
                    return
                brackets = text.count("[", pos, end) + text.count("{", pos, end)
                if brackets > max_depth and _deeper_than(row, max_depth):
                    self._too_deep(name, None, index)
                else:
                    self._accept(row, name, None, index)
                pos = _skip_ws(text, end)
                if text.startswith(",", pos):
                    pos = _skip_ws(text, pos + 1)
                    index += 1
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    self.error(name, None, index, None, "invalid_json",
                               "invalid JSON: expected ',' or ']' after the element "
                               + _at(text, pos))
                    return
        pos = _skip_ws(text, pos)
        if pos != len(text):
            self.error(name, None, None, None, "invalid_json",
                       f"invalid JSON: extra data after the array {_at(text, pos)}")

    # -- checking rows -------------------------------------------------------------------------

    def _accept(self, row: Any, file: str, line: int | None, index: int | None) -> None:
        """Check one decoded row, normalise it, and hand it to the splitter unless it repeats."""
        if type(row) is not dict:
            self.error(file, line, index, None, "not_an_object",
                       f"expected a JSON object, got {_type_name(row)}")
            return
        fmt = _classify(row)
        if self.forced:
            if fmt is not None and fmt != "both" and fmt != self.format:
                self.error(file, line, index, None, "format_mismatch",
                           f"row is in {fmt} format, but format={self.format!r} was requested")
                return
            fmt = self.format
        elif fmt is None:
            self.error(file, line, index, None, "unknown_format",
                       "row matches neither format: needs 'messages' (messages format) or "
                       f"'instruction' and 'output' (alpaca format); found {_keys(row)}")
            return
        elif fmt == "both":
            self.error(file, line, index, None, "unknown_format",
                       "row has fields of both formats ('messages' and 'instruction'/'output')")
            return
        seen = self.formats_seen.get(fmt)
        if seen is None:
            self.formats_seen[fmt] = seen = [0, _where(file, line, index)]
        seen[0] += 1
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            first = self.formats_seen[self.format][1]
            self.error(file, line, index, None, "mixed_format",
                       f"row is in {fmt} format, but earlier rows are {self.format} "
                       f"(first at {first})")
            return

        messages, problems = _FROM[fmt](row)
        if problems:
            for path, kind, message in problems:
                self.error(file, line, index, path, kind, message)
            return
        for turn in messages:
            if turn["role"] == "assistant" and not turn["content"].strip():
                self.warn(f"{_where(file, line, index)}: empty assistant output")
                break
        out = _ENCODE({"messages": messages})
        try:
            digest = hashlib.blake2b(out.encode("utf-8"), digest_size=16,
                                     key=self.splitter.key).digest()
        except UnicodeEncodeError:
            self.error(file, line, index, None, "invalid_unicode",
                       "text contains an unpaired surrogate escape (e.g. \\ud800)")
            return
        if digest in self.seen:
            self.dropped += 1
            self.warn(f"{_where(file, line, index)}: duplicate of an earlier row, dropped")
            return
        self.seen.add(digest)
        self.splitter.add(out, digest)
        if len(self.preview) < 3:
            self.preview.append({"messages": messages})

    # -- bookkeeping ---------------------------------------------------------------------------

    def error(self, file: str | None, line: int | None, index: int | None, path: str | None,
              kind: str, message: str, first: bool = False) -> None:
        self.error_count += 1
        self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        if first and self.max_errors > 0:
            self.errors.insert(0, RowError(file, line, index, path, message, kind))
            del self.errors[self.max_errors:]
        elif len(self.errors) < self.max_errors:
            self.errors.append(RowError(file, line, index, path, message, kind))

    def warn(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < self.max_errors:
            self.warnings.append(message)

    def _too_deep(self, file: str, line: int | None, index: int | None) -> None:
        self.error(file, line, index, None, "too_deep",
                   f"JSON is nested deeper than max_depth ({self.limits.max_depth})")

    def _count_bytes(self, file: str, n: int) -> bool:
        self.bytes_read += n
        if self.bytes_read <= self.limits.max_bytes:
            return True
        self.error(file, None, None, None, "too_many_bytes",
                   f"dataset is larger than max_bytes ({self.limits.max_bytes} bytes, "
                   "decompressed); reading stopped")
        self.stopped = True
        return False

    def _count_row(self, file: str, line: int | None, index: int | None) -> bool:
        if self.rows < self.limits.max_rows:
            self.rows += 1
            return True
        self.error(file, line, index, None, "too_many_rows",
                   f"dataset has more than max_rows ({self.limits.max_rows}) rows; reading stopped")
        self.stopped = True
        return False


# -- the two formats -------------------------------------------------------------------------

Problem = tuple[str, str, str]  # (field path, kind, message)
_MISSING = object()
_ROLES = ("system", "user", "assistant")


def _classify(row: dict) -> str | None:
    has_messages = "messages" in row
    has_alpaca = "instruction" in row or "output" in row
    if has_messages:
        return "both" if has_alpaca else "messages"
    return "alpaca" if has_alpaca else None


def _from_alpaca(row: dict) -> tuple[list[dict[str, str]], list[Problem]]:
    problems: list[Problem] = []
    instruction = _string(row, "instruction", problems, required=True, non_empty=True)
    output = _string(row, "output", problems, required=True)
    extra = _string(row, "input", problems)
    system = _string(row, "system", problems)
    if problems:
        return [], problems
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages, problems


def _from_messages(row: dict) -> tuple[list[dict[str, str]], list[Problem]]:
    problems: list[Problem] = []
    turns = row.get("messages", _MISSING)
    if turns is _MISSING:
        return [], [("messages", "missing_field", "missing required field")]
    if type(turns) is not list:
        return [], [("messages", "wrong_type", f"expected an array, got {_type_name(turns)}")]
    if not turns:
        return [], [("messages", "empty_value", "must not be empty")]
    messages = []
    has_assistant = False
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            problems.append((f"messages[{i}]", "wrong_type",
                             f"expected an object, got {_type_name(turn)}"))
            continue
        role = _string(turn, "role", problems, required=True, path=f"messages[{i}].role")
        content = _string(turn, "content", problems, required=True, path=f"messages[{i}].content")
        if role not in _ROLES and type(turn.get("role")) is str:  # else already reported
            problems.append((f"messages[{i}].role", "invalid_value",
                             f"expected one of system, user, assistant, got {_short(role)}"))
        has_assistant = has_assistant or role == "assistant"
        messages.append({"role": role, "content": content})
    if not problems and not has_assistant:
        problems.append(("messages", "invalid_value", "needs at least one assistant turn"))
    return messages, problems


_FROM = {"alpaca": _from_alpaca, "messages": _from_messages}


def _string(obj: dict, key: str, problems: list[Problem], *, required: bool = False,
            non_empty: bool = False, path: str | None = None) -> str:
    """Read a string field, recording why not. An optional field may be absent or null."""
    value = obj.get(key, _MISSING)
    if type(value) is str:
        if non_empty and not value.strip():
            problems.append((path or key, "empty_value", "must not be empty"))
        return value
    if value is _MISSING or (value is None and not required):
        if required:
            problems.append((path or key, "missing_field", "missing required field"))
        return ""
    problems.append((path or key, "wrong_type", f"expected a string, got {_type_name(value)}"))
    return ""


# -- helpers ---------------------------------------------------------------------------------

_WS_BYTES = b" \t\r\n"  # JSON's whitespace; bytes.strip() alone would also eat \v and \f
_skip_ws_match = re.compile(r"[ \t\r\n]*").match
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # no NaN / Infinity
_decode = _DECODER.decode


def _skip_ws(text: str, pos: int) -> int:
    return _skip_ws_match(text, pos).end()


def _json_message(e: ValueError, lines: bool = False) -> str:
    if isinstance(e, json.JSONDecodeError):
        where = f"line {e.lineno} column {e.colno}" if lines else f"column {e.colno}"
        return f"invalid JSON: {e.msg} at {where}"
    return f"invalid JSON: {e}"


def _at(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"at line {line} column {pos - text.rfind(chr(10), 0, pos)}"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests deeper than `limit`, walked without recursion."""
    if type(value) not in (dict, list):
        return False
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) in (dict, list):
                stack.append((child, depth + 1))
    return False


def _where(file: str | None, line: int | None, index: int | None) -> str:
    if line is not None:
        return f"{file} line {line}"
    if index is not None:
        return f"{file} index {index}"
    return file if file is not None else "dataset"


_TYPE_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
               list: "array", dict: "object"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(row: dict) -> str:
    if not row:
        return "no fields"
    names = ", ".join(_short(k, 30) for k in list(row)[:5])
    return f"fields {names}" + (", ..." if len(row) > 5 else "")


class _HashingReader(io.RawIOBase):
    """The caller's stream as a raw reader that hashes every byte on the way through, so the
    checksum needs no second pass. It hashes the bytes as given (compressed, if gzip)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        if not data:
            return 0
        n = len(data)
        buffer[:n] = data
        self._sha.update(data)
        return n

    def drain_and_hexdigest(self) -> str:
        """Hash what the reader above did not need (a gzip trailer, bytes after an error)."""
        while data := self._stream.read(1 << 20):
            self._sha.update(data)
        return self._sha.hexdigest()
