"""Check a fine-tuning dataset row by row and write its canonical form, in one streaming pass.

`validate` reads each file as a stream (reading.py), checks every row against its format
(formats.py) and writes the good rows, in the canonical form of their format, to train / valid
/ test sinks, after dropping duplicates and rows outside the length limits (refining.py). Bad
data never raises: it becomes errors in the report. Memory stays flat in the size of the input,
except for duplicate detection, which keeps about 9 bytes per row.

Where an error points:
  * a JSONL row has `line`, the 1-based physical line in the (decompressed) file;
  * a JSON-array row has `index`, the 0-based position in the array, and `line` is None;
  * a problem with a whole file or the whole dataset has neither.

Formats: every row of a dataset (all its files) must be in one format. With `format="auto"` the
first recognised row decides it; a row in another format is an error, and a summary error says
how many rows of each format were seen and where each first appeared. With a training `method`,
a format that method cannot train on is an error too.

Splits: rows of a source marked "auto" are split between train and valid by a seeded hash of
their content (stable, one pass). A source marked "train", "valid" or "test" goes to that sink:
a given validation or test file is kept as it is (normalised and checked; neither deduplicated
nor filtered), and a row of it that also appears in the training data is a warning.

Limits: going over max_bytes or max_rows stops reading (that file's sha256 is then None); a
line (or array element) over max_line_bytes or a row nested deeper than max_depth is an error
for that row only.

Bad rows: with on_invalid="reject" (the default) any error makes the dataset invalid. With
"drop", a row with errors is left out instead, and counted by the kind of its first error
(`invalid_reasons`; each error is still listed, as a warning); problems with a file or the
dataset as a whole (mixed formats, limits that stop reading) still reject it. Either way, fewer
than `min_rows` rows written is an error.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal, NamedTuple

import msgspec

from .fields import field_names, type_name
from .formats import FORMATS, METHOD_FORMATS, chars_of, detect, methods_for, text_of
from .reading import Element, FileReader, Lines, Problem
from .refining import DigestSet, LengthStats, Splitter, row_key
from .tokens import ESTIMATE, TokenCounter

Split = Literal["auto", "train", "valid", "test"]


class Source(NamedTuple):
    name: str  # how errors name the file (its URI or path)
    stream: BinaryIO
    split: Split = "auto"


@dataclass(frozen=True)
class Limits:
    """Bounds that turn hostile or runaway input into a rejection instead of an outage."""

    max_bytes: int = 1 << 30  # decompressed bytes, all files together
    max_rows: int = 10_000_000  # rows, all files together
    max_line_bytes: int = 1 << 20  # one JSONL line or array element, not counting its line ending
    max_depth: int = 32  # JSON nesting of one row; the row object itself is depth 1


@dataclass(frozen=True)
class Refinement:
    """What happens to good rows of the training data before they are written."""

    dedupe: bool = True  # drop a row whose canonical form repeats an earlier row's
    min_chars: int = 0  # drop rows with fewer characters of text than this
    max_chars: int | None = None  # drop rows with more


@dataclass(frozen=True)
class Policy:
    """What a deployment decides for every dataset it validates (TUNEBUS_VALIDATOR__*, see
    config.py), beside what each request decides. `Policy.validate` is the one way tunebus
    validates: the service, its request/reply check and `tunebus validate` all go through it."""

    limits: Limits = Limits()
    refinement: Refinement = Refinement()
    min_rows: int = 1  # fewer rows left than this: rejected (after on_invalid="drop" too)
    max_errors: int = 50  # errors and warnings kept in a report (all are counted)

    def validate(self, files: Iterable[Source | tuple], **options: Any) -> ValidationReport:
        """`validate(files, **options)` under this policy (a request may say how many errors
        it wants listed)."""
        options.setdefault("max_errors", self.max_errors)
        return validate(files, limits=self.limits, refinement=self.refinement,
                        min_rows=self.min_rows, **options)


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
        field = f"{self.field}: " if self.field else ""
        return f"{where(self.file, self.line, self.index)}: {field}{self.message}"


@dataclass
class ValidationReport:
    valid: bool
    reason: str | None  # one line saying why not, when not valid
    format: str | None  # the input format, e.g. "alpaca"
    kind: str | None  # its canonical form: messages, text, preference or grpo
    methods: list[str]  # the training methods that can use this format
    rows: int  # rows read (non-blank JSONL lines and array elements), good or bad
    train_rows: int
    valid_rows: int
    test_rows: int
    dropped: int  # good rows not written (duplicates, outside the length limits)
    dropped_reasons: dict[str, int]
    invalid_rows: int  # bad rows left out (on_invalid="drop")
    invalid_reasons: dict[str, int]  # by the kind of each one's first error
    errors: list[RowError]  # the first max_errors
    error_count: int  # all of them
    error_counts_by_kind: dict[str, int]
    warnings: list[str]  # the first max_errors
    warning_count: int
    warning_counts_by_kind: dict[str, int]
    sha256: dict[str, str | None]  # per file, of its bytes as given; None if not read to the end
    rows_by_file: dict[str, int]
    sample_preview: list[dict[str, Any]] = field(default_factory=list)  # first output rows
    token_stats: dict[str, float] | None = None  # min, mean, p50, p95, max of written rows
    token_counter: str = ESTIMATE  # what counted the tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def contract_fields(self, max_errors: int = 50) -> dict[str, Any]:
        """The report as the fields of the contracts' DatasetReport, in plain data (what
        `tunebus validate --json` prints without loading the contracts)."""
        return {
            "valid": self.valid, "reason": self.reason, "format": self.format,
            "methods": self.methods, "rows": self.rows, "train_rows": self.train_rows,
            "valid_rows": self.valid_rows, "test_rows": self.test_rows,
            "dropped": self.dropped, "dropped_reasons": self.dropped_reasons,
            "invalid_rows": self.invalid_rows, "invalid_reasons": self.invalid_reasons,
            "errors": [{"file": e.file or "", "line": e.line, "index": e.index,
                        "field": e.field, "message": e.message, "kind": e.kind}
                       for e in self.errors[:max_errors]],
            "error_count": self.error_count, "error_counts": self.error_counts_by_kind,
            "warnings": self.warnings[:max_errors], "warning_count": self.warning_count,
            "warning_counts": self.warning_counts_by_kind, "preview": self.sample_preview,
            "token_stats": self.token_stats, "token_counter": self.token_counter,
            "sha256": self.sha256,
        }


def validate(
    files: Iterable[Source | tuple],
    *,
    format: str = "auto",
    method: str | None = None,
    train_sink: BinaryIO | None = None,
    valid_sink: BinaryIO | None = None,
    test_sink: BinaryIO | None = None,
    seed: int = 0,
    valid_fraction: float = 0.1,
    limits: Limits = Limits(),
    refinement: Refinement = Refinement(),
    tokens: TokenCounter | None = None,
    max_seq_length: int | None = None,
    max_errors: int = 50,
    preview_rows: int = 3,
    progress: Callable[[int, int], None] | None = None,
    on_invalid: Literal["reject", "drop"] = "reject",
    min_rows: int = 1,
) -> ValidationReport:
    """Check every row of `files` and write the good ones, canonical JSONL, to the sinks
    (binary, one row per line). When the report is not valid the sinks may hold part of the
    output, and the caller should discard them. `progress(rows, bytes)` is called about once
    per megabyte read."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, not {format!r}")
    if method is not None and method not in METHOD_FORMATS:
        raise ValueError(f"method must be one of {', '.join(METHOD_FORMATS)}, not {method!r}")
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be between 0 and 1, not {valid_fraction}")
    if on_invalid not in ("reject", "drop"):
        raise ValueError(f"on_invalid must be reject or drop, not {on_invalid!r}")
    run = _Run(format, method, limits, refinement, tokens, max_seq_length, max_errors,
               preview_rows, progress, (train_sink, valid_sink, test_sink), seed, valid_fraction)
    run.drop_invalid, run.min_rows = on_invalid == "drop", min_rows
    if run.format is not None and method is not None and run.format not in METHOD_FORMATS[method]:
        run.wrong_method(None, None, None, run.format)
        return run.finish()
    for item in files:
        run.read_file(item if isinstance(item, Source) else Source(*item))
        if run.stopped:
            break
    return run.finish()


class _Run:
    """The state of one validation: counters, the refinement state, and what has been said."""

    def __init__(self, format, method, limits, refinement, tokens, max_seq_length, max_errors,
                 preview_rows, progress, sinks, seed, valid_fraction):
        self.forced = format != "auto"
        self.format: str | None = format if self.forced else None
        self.method = method
        self.limits = limits
        self.tokens: TokenCounter | None = tokens
        self.max_seq = max_seq_length or sys.maxsize
        self.max_errors = max_errors
        self.progress = progress
        self.stopped = False  # a dataset-wide limit was hit; read nothing more
        self.rows = self.bytes_read = 0
        self.fast: Callable | None = None  # the format's fast path, once the format is known
        if self.forced:
            self._set_format(format)

        self.dedupe = refinement.dedupe
        self.min_chars = refinement.min_chars
        self.max_chars = sys.maxsize if refinement.max_chars is None else refinement.max_chars
        self.key = row_key(seed)
        self.splitter = Splitter(sinks[0], sinks[1], valid_fraction)
        self.sinks = dict(zip(("train", "valid", "test"), sinks))
        self.given_rows = {"train": 0, "valid": 0, "test": 0}  # rows of files given per split
        self.seen = DigestSet()
        self.lengths = LengthStats()
        self.pending: list[tuple[str, str | None, int | None, int | None]] = []  # to tokenize
        self.preview: list[dict[str, Any]] = []
        self.preview_rows = preview_rows
        self.emit, self.emit_lines = self._emitter("auto")

        self.errors: list[RowError] = []
        self.error_count = 0
        self.error_counts: dict[str, int] = {}
        self.warnings: list[str] = []
        self.warning_count = 0
        self.warning_counts: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.drop_invalid = False  # on_invalid="drop"
        self.min_rows = 1
        self.invalid: dict[str, int] = {}  # bad rows left out, by the kind of their first error
        self.last_invalid: tuple | None = None  # where the last one was (a row's errors follow)
        self.mismatch: str | None = None  # why the format does not suit the method
        self.sha256: dict[str, str | None] = {}
        self.rows_by_file: dict[str, int] = {}
        self.formats_seen: dict[str, list[Any]] = {}  # format -> [row count, where first seen]

    def _set_format(self, fmt: str) -> None:
        self.format = fmt
        make_fast = FORMATS[fmt].fast
        # With a tokenizer each row's text is needed, which only the full check provides.
        self.fast = make_fast() if make_fast is not None and self.tokens is None else None

    # -- reading files -------------------------------------------------------------------------

    def read_file(self, source: Source) -> None:
        name = source.name
        self.emit, self.emit_lines = self._emitter(source.split)
        rows_before = self.rows
        limits = self.limits
        reader = FileReader(source.stream, max_line_bytes=limits.max_line_bytes,
                            max_depth=limits.max_depth, max_bytes=limits.max_bytes,
                            bytes_before=self.bytes_read)
        for item in reader:
            kind = type(item)
            if kind is Lines:
                self._lines(name, item)
            elif kind is Element:
                self._element(name, item)
            else:
                self._problem(name, item)
            if self.stopped:
                break
            if self.progress is not None:
                self.progress(self.rows, self.bytes_read + reader.bytes_read)
        self.bytes_read += reader.bytes_read
        self.sha256[name] = None if self.stopped else reader.sha256()
        self.rows_by_file[name] = self.rows - rows_before

    def _lines(self, name: str, batch: Lines) -> None:
        lines, lineno = batch.lines, batch.first
        if self.rows + len(lines) > self.limits.max_rows:  # count them one by one
            for line in lines:
                self._line(name, lineno, line)
                if self.stopped:
                    return
                lineno += 1
            return
        for i, line in enumerate(lines):
            if self.fast is not None:
                self._fast_lines(name, lineno, lines[i:] if i else lines, batch.brackets)
                return
            self._line(name, lineno, line)  # until the first row has decided the format
            lineno += 1

    def _fast_lines(self, name: str, lineno: int, lines: list, brackets: int) -> None:
        """The hot loop. The fast path decodes every line first; then, if the lines it took
        are too few to account for the batch's brackets, any of them could nest deeper than
        max_depth, so those are counted one by one (each line the fast path takes is an
        object: it holds at least one bracket, a too-deep one more than max_depth)."""
        fast, max_depth = self.fast, self.limits.max_depth
        results = [fast(line) for line in lines]  # None: over to the full check
        taken = len(results) - results.count(None)
        if brackets >= taken + max_depth:
            for i, got in enumerate(results):
                if got is not None and lines[i].count(b"{") + lines[i].count(b"[") > max_depth:
                    results[i] = None
                    taken -= 1
        self.emit_lines(name, lineno, lines, results, self._line)
        self.rows += taken
        if (seen := self.formats_seen.get(self.format)) is not None:
            seen[0] += taken

    def _line(self, name: str, lineno: int, line: bytes | None) -> None:
        if line is None:
            if self._count_row(name, lineno, None):
                self.error(name, lineno, None, None, "line_too_long",
                           f"line is longer than max_line_bytes ({self.limits.max_line_bytes} "
                           "bytes)")
            return
        line = line.strip(b" \t\r\n")
        if line and self._count_row(name, lineno, None):
            self._decode(line, name, lineno, None)

    def _element(self, name: str, element: Element) -> None:
        index = element.index
        if not self._count_row(name, None, index):
            return
        data = element.data
        if element.problem == "too_deep":
            self._too_deep(name, None, index)
            return
        if data is None:
            self.error(name, None, index, None, "line_too_long",
                       f"element is longer than max_line_bytes ({self.limits.max_line_bytes} "
                       "bytes)")
            return
        fast = self.fast
        if fast is not None and data.count(b"{") + data.count(b"[") <= self.limits.max_depth:
            got = fast(data)
            if got is not None:
                self.emit(got[0], got[1], name, None, index)
                if (seen := self.formats_seen.get(self.format)) is not None:
                    seen[0] += 1
                return
        self._decode(data, name, None, index, element)

    def _problem(self, name: str, problem: Problem) -> None:
        # A problem with the file's structure ends its reading: never a row to drop.
        self.error(name, None, problem.index, None, problem.kind, problem.message,
                   droppable=False)
        if problem.kind == "too_many_bytes":
            self.stopped = True

    def _decode(self, data: bytes, file: str, line: int | None, index: int | None,
                element: Element | None = None) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.error(file, line, index, None, "invalid_utf8",
                       f"invalid UTF-8 at byte {e.start + 1}")
            return
        try:
            row = _decode(text)
        except RecursionError:
            self._too_deep(file, line, index)
            return
        except ValueError as e:
            self.error(file, line, index, None, "invalid_json", _json_message(e, element))
            return
        max_depth = self.limits.max_depth
        # Counting brackets is a cheap upper bound on depth; walk the row only when it fails.
        if data.count(b"[") + data.count(b"{") > max_depth and _deeper_than(row, max_depth):
            self._too_deep(file, line, index)
            return
        self.accept(row, file, line, index)

    # -- checking rows -------------------------------------------------------------------------

    def accept(self, row: Any, file: str, line: int | None, index: int | None) -> None:
        """The full check of one decoded row: its format, its fields, then out it goes."""
        if type(row) is not dict:
            self.error(file, line, index, None, "not_an_object",
                       f"expected a JSON object, got {type_name(row)}")
            return
        fmt = self._format_of(row, file, line, index)
        if fmt is None:
            return
        normalized, problems, warnings = FORMATS[fmt].normalize(row)
        if problems:
            for path, kind, message in problems:
                self.error(file, line, index, path, kind, message)
            return
        try:
            out = _encode(normalized) + b"\n"
        except UnicodeEncodeError:
            self.error(file, line, index, None, "invalid_unicode",
                       "text contains an unpaired surrogate escape (e.g. \\ud800)")
            return
        for kind, message in warnings:
            self.warn(kind, file, line, index, message)
        kind = FORMATS[fmt].kind
        text = text_of(kind, normalized) if self.tokens is not None else None
        self.emit(out, chars_of(kind, normalized), file, line, index, text)

    def _format_of(self, row: dict, file: str, line: int | None, index: int | None) -> str | None:
        """The row's format, or None once the reason it has none is recorded."""
        found = detect(row)
        if self.forced:
            if found and self.format not in found:
                self.error(file, line, index, None, "format_mismatch",
                           f"row is in {' and '.join(found)} format, but "
                           f"format={self.format!r} was requested")
                return None
            return self.format
        if not found:
            allowed = METHOD_FORMATS.get(self.method, tuple(FORMATS))
            needs = "; ".join(f"{FORMATS[f].needs} ({f})" for f in allowed)
            self.error(file, line, index, None, "unknown_format",
                       f"row matches no known format: needs {needs}; found {field_names(row)}")
            return None
        if len(found) > 1:
            self.error(file, line, index, None, "ambiguous_format",
                       "row has the fields of several formats ("
                       + "; ".join(f"{f}: {FORMATS[f].needs}" for f in found) + ")")
            return None
        fmt = found[0]
        if self.method is not None and fmt not in METHOD_FORMATS[self.method]:
            self.wrong_method(file, line, index, fmt)
            return None
        seen = self.formats_seen.get(fmt)
        if seen is None:
            self.formats_seen[fmt] = seen = [0, where(file, line, index)]
        seen[0] += 1
        if self.format is None:
            self._set_format(fmt)
        elif fmt != self.format:
            first = self.formats_seen[self.format][1]
            self.error(file, line, index, None, "mixed_format",
                       f"row is in {fmt} format, but earlier rows are {self.format} "
                       f"(first at {first})")
            return None
        return fmt

    def wrong_method(self, file: str | None, line: int | None, index: int | None,
                     fmt: str) -> None:
        takes = " or ".join(METHOD_FORMATS[self.method])
        if self.mismatch is None:
            self.mismatch = (f"dataset is in {fmt} format, which method {self.method!r} cannot "
                             f"train on ({self.method} takes {takes}; {fmt} suits "
                             f"{' or '.join(methods_for(fmt))})")
        self.error(file, line, index, None, "wrong_method",
                   f"row is in {fmt} format, which method {self.method!r} cannot train on "
                   f"({self.method} takes {takes})")

    # -- good rows -----------------------------------------------------------------------------

    def _emitter(self, split: Split) -> tuple[Callable, Callable]:
        """`emit`, the function every good row of a file goes through (length filter,
        duplicate check, split, length statistics), and `emit_lines`, the same for a batch of
        JSONL lines. They run once per row, so they are built once per file with what they
        need bound to local names, and the common case of each step is written inline."""
        if split in ("valid", "test"):
            return self._emitter_kept(split)
        run = self
        to_splitter = split == "auto"
        min_chars, max_chars, max_seq = self.min_chars, self.max_chars, self.max_seq
        key, sha1 = self.key, hashlib.sha1  # (no `usedforsecurity=False`: a keyword per row)
        seen = self.seen
        buckets = seen.buckets if self.dedupe else None
        splitter = self.splitter
        counts, writes, threshold = splitter.counts, splitter.writes, splitter.threshold
        tokens = self.tokens
        bins, cap, add_long = self.lengths.bins, LengthStats.CAP, self.lengths.add_long

        filtering = min_chars > 0 or max_chars < sys.maxsize
        preview = self.preview
        preview_left = max(0, self.preview_rows - len(preview))

        def emit(out: bytes, chars: int, file: str, line: int | None, index: int | None = None,
                 text: str | None = None) -> None:
            """`out` is the canonical JSON of the row and its newline."""
            nonlocal preview_left
            if filtering and (chars < min_chars or chars > max_chars):
                run._drop("too_short" if chars < min_chars else "too_long", file, line, index,
                          f"{chars} characters of text, outside the length limits; dropped")
                return
            digest = sha1(key + out).digest()
            if buckets is not None:  # DigestSet.add, its common case inline
                bucket = buckets[digest[16] << 8 | digest[17]]
                row_key = digest[8:16]
                if bucket.find(row_key) < 0:
                    bucket += row_key
                elif not seen.add(digest):
                    run._drop("duplicate", file, line, index,
                              "duplicate of an earlier row, dropped")
                    return
            if not to_splitter:
                run._write("train", out)
            elif splitter.settled:  # Splitter.add, its common case inline
                side = digest < threshold
                counts[side] += 1
                writes[side](out)
            else:
                splitter.add(out, digest)
            if tokens is None:
                n = (chars + 3) >> 2  # tokens.estimate, inline
                if n < cap:
                    bins[n] += 1
                else:
                    add_long(n)
                if n > max_seq:
                    run._too_long_for_model(n, file, line, index)
            else:
                run._queue_tokens(text, file, line, index)
            if preview_left:
                preview.append(json.loads(out))
                preview_left -= 1

        def emit_lines(file: str, lineno: int, lines: list, results: list, slow: Callable) -> None:
            """A batch of JSONL lines with what the fast path made of them (None: `slow`).
            Once nothing but the split and the duplicate check is left to do (no length filter,
            no tokenizer, the preview full, both splits started) `emit` is written out inline:
            this is the loop a large dataset spends its time in."""
            plain = (to_splitter and buckets is not None and not filtering and tokens is None
                     and not preview_left and splitter.settled)
            if plain and None not in results:
                ns = [(got[1] + 3) >> 2 for got in results]  # tokens.estimate
                if max(ns) <= max_seq:  # (else its warnings are said in order, below)
                    emit_taken(file, lineno, results, ns)
                    return
            for line, got in zip(lines, results):
                if got is None:
                    slow(file, lineno, line)
                elif not plain:
                    emit(got[0], got[1], file, lineno)
                else:
                    out, chars = got
                    digest = sha1(key + out).digest()
                    bucket = buckets[digest[16] << 8 | digest[17]]
                    row_key = digest[8:16]
                    if bucket.find(row_key) < 0:
                        bucket += row_key
                    elif not seen.add(digest):
                        run._drop("duplicate", file, lineno, None,
                                  "duplicate of an earlier row, dropped")
                        lineno += 1
                        continue
                    side = digest < threshold
                    counts[side] += 1
                    writes[side](out)
                    n = (chars + 3) >> 2
                    if n < cap:
                        bins[n] += 1
                    else:
                        add_long(n)
                    if n > max_seq:
                        run._too_long_for_model(n, file, lineno, None)
                lineno += 1

        def emit_taken(file: str, lineno: int, results: list, ns: list[int]) -> None:
            """emit_lines' plain loop for a batch the fast path took whole, a step at a time
            over the batch: what each row needs alone (its digest, the duplicate check) in one
            loop, the rest (the split, the writes, the length counts) per batch."""
            outs = [got[0] for got in results]
            digests = [sha1(key + out).digest() for out in outs]
            duplicates = []
            for i, digest in enumerate(digests):  # DigestSet.add, its common case inline
                bucket = buckets[digest[16] << 8 | digest[17]]
                row_key = digest[8:16]
                if bucket.find(row_key) < 0:
                    bucket += row_key
                elif not seen.add(digest):
                    duplicates.append(i)
            if duplicates:
                for i in duplicates:
                    run._drop("duplicate", file, lineno + i, None,
                              "duplicate of an earlier row, dropped")
                gone = set(duplicates)
                kept = [i for i in range(len(outs)) if i not in gone]
                outs, digests, ns = ([xs[i] for i in kept] for xs in (outs, digests, ns))
            sides = [digest < threshold for digest in digests]  # True: valid
            valid = sum(sides)
            counts[True] += valid
            counts[False] += len(sides) - valid
            if valid:
                writes[True](b"".join([out for out, side in zip(outs, sides) if side]))
            if valid < len(sides):
                writes[False](b"".join([out for out, side in zip(outs, sides) if not side]))
            for n, times in Counter(ns).items():
                if n < cap:
                    bins[n] += times
                else:
                    for _ in range(times):
                        add_long(n)

        return emit, emit_lines

    def _emitter_kept(self, split: Split) -> tuple[Callable, Callable]:
        """For a given validation or test file: kept as it is, only measured."""

        def emit(out: bytes, chars: int, file: str, line: int | None, index: int | None = None,
                 text: str | None = None) -> None:
            if hashlib.sha1(self.key + out).digest() in self.seen:
                self.warn("in_training_data", file, line, index, "also in the training data")
            self._write(split, out)
            if self.tokens is None:
                n = (chars + 3) >> 2
                self.lengths.add(n)
                if n > self.max_seq:
                    self._too_long_for_model(n, file, line, index)
            else:
                self._queue_tokens(text, file, line, index)

        def emit_lines(file: str, lineno: int, lines: list, results: list, slow: Callable) -> None:
            for line, got in zip(lines, results):
                if got is None:
                    slow(file, lineno, line)
                else:
                    emit(got[0], got[1], file, lineno)
                lineno += 1

        return emit, emit_lines

    def _queue_tokens(self, text: str, file: str, line: int | None, index: int | None) -> None:
        self.pending.append((text, file, line, index))
        if len(self.pending) >= 1024:
            self._count_tokens()

    def _write(self, split: str, out: bytes) -> None:
        self.given_rows[split] += 1
        if (sink := self.sinks[split]) is not None:
            sink.write(out)

    def _count_tokens(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        for n, (_, file, line, index) in zip(self.tokens.lengths([p[0] for p in pending]),
                                             pending):
            self.lengths.add(n)
            if n > self.max_seq:
                self._too_long_for_model(n, file, line, index)

    def _too_long_for_model(self, n: int, file: str, line: int | None, index: int | None) -> None:
        about = "about " if self.tokens is None else ""
        self.warn("longer_than_max_seq_length", file, line, index,
                  f"{about}{n} tokens, longer than max_seq_length ({self.max_seq}): "
                  "training truncates it")

    def _drop(self, reason: str, file: str, line: int | None, index: int | None,
              message: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.warn(reason, file, line, index, message)

    # -- bookkeeping ---------------------------------------------------------------------------

    def error(self, file: str | None, line: int | None, index: int | None, path: str | None,
              kind: str, message: str, first: bool = False, droppable: bool = True) -> None:
        if self.drop_invalid and droppable and (line is not None or index is not None) \
                and kind not in _DATASET_ERRORS:
            self._drop_invalid(file, line, index, path, kind, message)
            return
        self.error_count += 1
        self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        if first and self.max_errors > 0:
            self.errors.insert(0, RowError(file, line, index, path, message, kind))
            del self.errors[self.max_errors:]
        elif len(self.errors) < self.max_errors:
            self.errors.append(RowError(file, line, index, path, message, kind))

    def _drop_invalid(self, file: str | None, line: int | None, index: int | None,
                      path: str | None, kind: str, message: str) -> None:
        if self.last_invalid != (file, line, index):  # a row's first error counts it
            self.last_invalid = (file, line, index)
            self.invalid[kind] = self.invalid.get(kind, 0) + 1
        field = f"{path}: " if path else ""
        self.warn("invalid_row", file, line, index, f"{field}{message} (row dropped: "
                  "on_invalid=drop)")

    def warn(self, kind: str, file: str | None, line: int | None, index: int | None,
             message: str) -> None:
        self.warning_count += 1
        self.warning_counts[kind] = self.warning_counts.get(kind, 0) + 1
        if len(self.warnings) < self.max_errors:
            self.warnings.append(f"{where(file, line, index)}: {message}")

    def _too_deep(self, file: str, line: int | None, index: int | None) -> None:
        self.error(file, line, index, None, "too_deep",
                   f"JSON is nested deeper than max_depth ({self.limits.max_depth})")

    def _count_row(self, file: str, line: int | None, index: int | None) -> bool:
        if self.rows < self.limits.max_rows:
            self.rows += 1
            return True
        self.error(file, line, index, None, "too_many_rows",
                   f"dataset has more than max_rows ({self.limits.max_rows}) rows; reading stopped")
        self.stopped = True
        return False

    def finish(self) -> ValidationReport:
        self._count_tokens()
        self.splitter.finish()
        if len(self.formats_seen) > 1:
            seen = ", ".join(f"{fmt} on {n} row{'s' * (n != 1)} (first at {first})"
                             for fmt, (n, first) in self.formats_seen.items())
            # Listed first: the per-row errors may be capped before they show both formats.
            self.error(None, None, None, None, "mixed_format",
                       f"rows are in mixed formats: {seen}", first=True)
        train, valid = self.splitter.counts
        train += self.given_rows["train"]
        valid += self.given_rows["valid"]
        written = train + valid + self.given_rows["test"]
        left_out = {**self.dropped, **{f"invalid ({k})": n for k, n in self.invalid.items()}}
        if self.error_count == 0 and written == 0:
            dropped = sum(left_out.values())
            self.error(None, None, None, None, "no_rows",
                       f"no rows left: all {dropped} were dropped "
                       f"({', '.join(f'{k}: {n}' for k, n in left_out.items())})"
                       if dropped else "no rows")
        elif self.error_count == 0 and written < self.min_rows:
            self.error(None, None, None, None, "too_few_rows",
                       f"{written} row{'s' * (written != 1)} left, fewer than min_rows "
                       f"({self.min_rows})" + (f"; dropped: " + ", ".join(
                           f"{k}: {n}" for k, n in left_out.items()) if left_out else ""))
        return ValidationReport(
            valid=self.error_count == 0,
            reason=self._reason(),
            format=self.format,
            kind=FORMATS[self.format].kind if self.format else None,
            methods=methods_for(self.format) if self.format else [],
            rows=self.rows,
            train_rows=train,
            valid_rows=valid,
            test_rows=self.given_rows["test"],
            dropped=sum(self.dropped.values()),
            dropped_reasons=self.dropped,
            invalid_rows=sum(self.invalid.values()),
            invalid_reasons=self.invalid,
            errors=self.errors,
            error_count=self.error_count,
            error_counts_by_kind=self.error_counts,
            warnings=self.warnings,
            warning_count=self.warning_count,
            warning_counts_by_kind=self.warning_counts,
            sha256=self.sha256,
            rows_by_file=self.rows_by_file,
            sample_preview=self.preview,
            token_stats=self.lengths.summary(),
            token_counter=ESTIMATE if self.tokens is None else self.tokens.name,
        )

    def _reason(self) -> str | None:
        if self.error_count == 0:
            return None
        if self.mismatch is not None and set(self.error_counts) == {"wrong_method"}:
            return self.mismatch
        n = self.error_count
        reason = f"{n} error{'s' * (n != 1)} in the dataset"
        if self.errors:
            reason += f"; first: {self.errors[0]}"
        return reason


# -- helpers ---------------------------------------------------------------------------------


# Errors about the dataset, not one row: on_invalid="drop" does not drop them.
_DATASET_ERRORS = frozenset({"too_many_rows", "too_many_bytes", "mixed_format"})


def where(file: str | None, line: int | None, index: int | None) -> str:
    if line is not None:
        return f"{file} line {line}"
    if index is not None:
        return f"{file} index {index}"
    return file if file is not None else "dataset"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# The full check decodes with the standard library for its precise error positions; NaN and
# Infinity are refused, as JSON has no such values.
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
_encode = msgspec.json.encode


def _json_message(e: ValueError, element: Element | None) -> str:
    if not isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e}"
    if element is None:
        return f"invalid JSON: {e.msg} at column {e.colno}"
    line = element.line + e.lineno - 1
    column = e.colno + (element.column - 1 if e.lineno == 1 else 0)
    return f"invalid JSON: {e.msg} at line {line} column {column}"


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
