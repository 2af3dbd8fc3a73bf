"""From the bytes of one dataset file to its rows, holding at most a chunk and one row at a time.

A file is JSONL unless its first non-blank byte is `[`, which makes it a JSON array, or it starts
with Parquet's magic bytes. gzip is recognised by its magic bytes (not the file name), a UTF-8
byte order mark is skipped, and CRLF line endings are accepted. `FileReader` yields three kinds
of items:

  * `Lines`: a run of JSONL lines as raw bytes, numbered from 1 in the decompressed file;
  * `Element`: one element of a JSON array, or one row of a Parquet file, as raw JSON bytes,
    with its 0-based index; an array is scanned element by element, never loaded whole, and a
    Parquet file (spooled to a temporary file: its index is at its end) is read a batch of one
    row group at a time, by pyarrow (the `parquet` extra);
  * `Problem`: something wrong with the file rather than a row (the reader stops after one).

A line or element longer than max_line_bytes is never held: it is yielded as None (and skipped)
so the caller can report it and carry on with the next one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

CHUNK = 1 << 20
PARQUET_BATCH = 1024  # rows decoded at a time (never more than a row group)
_WS = b" \t\r\n"


@dataclass(slots=True)
class Lines:
    first: int  # the line number of lines[0]
    lines: list[bytes | None]  # line endings removed (a "\r" may remain); None: too long
    brackets: int  # "{" and "[" in these lines (an upper bound: maybe a few more)


@dataclass(slots=True)
class Element:
    index: int
    data: bytes | None  # None when not held, see `problem`
    line: int  # where the element starts (1-based line and column)
    column: int
    problem: str | None = None  # "too_long" or "too_deep" (found while scanning)


@dataclass(slots=True)
class Problem:
    kind: str
    message: str
    index: int | None = None


class FileReader:
    """Iterate over one file's rows. `bytes_read` counts decompressed bytes; reading stops with
    a `too_many_bytes` problem once it passes `byte_budget`. `sha256()` is the digest of the
    file's bytes as given (compressed, if gzip), computed on the way through."""

    def __init__(self, stream: BinaryIO, *, max_line_bytes: int, max_depth: int,
                 max_bytes: int, bytes_before: int = 0) -> None:
        self.raw = _HashingReader(stream)
        self.max_line = max_line_bytes
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.budget = max_bytes - bytes_before  # the dataset's other files used the rest
        self.bytes_read = 0
        self._data: Any = None

    def sha256(self) -> str:
        return self.raw.drain_and_hexdigest()

    def __iter__(self) -> Iterator[Lines | Element | Problem]:
        buffered = io.BufferedReader(self.raw, CHUNK)
        try:
            if buffered.peek(4)[:4] == b"PAR1":
                yield from self._parquet(buffered)
                return
            if buffered.peek(2)[:2] == b"\x1f\x8b":
                self._data = gzip.GzipFile(fileobj=buffered, mode="rb")
            else:
                self._data = buffered
            yield from self._rows()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            yield Problem("invalid_gzip", f"cannot decompress: {e}")

    def _read(self) -> bytes | None:
        """The next chunk; None once the byte budget is spent."""
        chunk = self._data.read(CHUNK)
        self.bytes_read += len(chunk)
        return chunk if self.bytes_read <= self.budget else None

    def _over_budget(self) -> Problem:
        return Problem("too_many_bytes", f"dataset is larger than max_bytes ({self.max_bytes} "
                       "bytes, decompressed); reading stopped")

    def _rows(self) -> Iterator[Lines | Element | Problem]:
        chunk = self._read()
        if chunk is not None:
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:] or self._read()
            elif chunk[:2] in (b"\xff\xfe", b"\xfe\xff"):
                yield Problem("invalid_utf8", "file is UTF-16 encoded; convert it to UTF-8")
                return
        line = 1
        while chunk is not None and chunk and not chunk.lstrip(_WS):  # blank lines: not held
            line += chunk.count(b"\n")
            chunk = self._read()
        if chunk is None:
            yield self._over_budget()
        elif chunk.lstrip(_WS).startswith(b"["):
            yield from self._array(chunk, line)
        elif chunk:
            yield from self._jsonl(chunk, line)

    # -- JSONL -----------------------------------------------------------------------------------

    def _jsonl(self, chunk: bytes, lineno: int) -> Iterator[Lines | Problem]:
        max_line = self.max_line
        carry = b""  # the start of a line whose end has not been read yet
        while chunk:
            data = carry + chunk if carry else chunk
            lines: list[bytes | None] = data.split(b"\n")
            carry = lines.pop()
            if lines and max(map(len, lines)) > max_line:
                lines = [None if _too_long(line, max_line) else line for line in lines]
            skipping = len(carry) > max_line + 1  # too long already, whatever ends it
            if skipping:
                lines.append(None)
                carry = b""
            brackets = data.count(b"{")
            if data.find(b"[") >= 0:  # find is far cheaper than count, and "[" is rare
                brackets += data.count(b"[")
            yield Lines(lineno, lines, brackets)
            lineno += len(lines)
            chunk = self._read()
            while skipping and chunk:  # drop the rest of the long line, never hold it
                end = chunk.find(b"\n")
                if end >= 0:
                    chunk, skipping = chunk[end + 1:], False
                    if not chunk:
                        chunk = self._read()
                else:
                    chunk = self._read()
            if chunk is None:
                yield self._over_budget()
                return
        if carry:
            yield Lines(lineno, [None if _too_long(carry, max_line) else carry],
                        carry.count(b"{") + carry.count(b"["))

    # -- Parquet ---------------------------------------------------------------------------------

    def _parquet(self, stream: BinaryIO) -> Iterator[Element | Problem]:
        """Each row as JSON, so that it meets every rule a JSON row meets (its encoded size
        counts as the line length and towards max_bytes)."""
        try:
            import pyarrow.parquet as pq
        except ImportError:
            yield Problem("parquet_unavailable", "reading Parquet needs pyarrow: install "
                          "tunebus with the parquet extra (pip install 'tunebus[parquet]')")
            return
        import msgspec

        encode = msgspec.json.encode
        with tempfile.TemporaryFile() as spool:
            shutil.copyfileobj(stream, spool, CHUNK)
            spool.seek(0)
            try:
                batches = pq.ParquetFile(spool).iter_batches(batch_size=PARQUET_BATCH)
                index = 0
                for batch in batches:
                    for row in batch.to_pylist():
                        data = encode(row)
                        self.bytes_read += len(data)
                        if self.bytes_read > self.budget:
                            yield self._over_budget()
                            return
                        yield Element(index, data if len(data) <= self.max_line else None, 0, 0)
                        index += 1
            except (OSError, ValueError) as e:  # pyarrow's ArrowException is both
                yield Problem("invalid_parquet", f"cannot read the Parquet file: {e}")

    # -- JSON arrays -----------------------------------------------------------------------------

    def _array(self, head: bytes, first_line: int) -> Iterator[Element | Problem]:
        """Scan the array element by element: brackets and strings are followed to find where
        each element ends, and only then is it handed over (and decoded by the caller)."""
        scan = _Scanner(head, self, first_line)
        scan.pos = head.index(b"[") + 1
        index = 0
        expected = "a value or ']'"
        while True:
            c = scan.next_token()
            if c is False:
                yield self._over_budget()
                return
            if c is None:
                yield Problem("invalid_json", "invalid JSON: the file ends inside the array "
                              "(it is not closed with ']')", index)
                return
            if c == b"]" and expected != "a value":
                break
            if c in b",]":
                yield Problem("invalid_json", f"invalid JSON: expected {expected} "
                              f"{scan.at()}", index)
                return
            line, column = scan.line_column()
            data, problem, cut_off = scan.element()
            if problem == "over_budget":
                yield self._over_budget()
                return
            if data is not None or problem is not None:
                yield Element(index, data, line, column, problem)
            if cut_off:
                yield Problem("invalid_json", f"invalid JSON: the file ends inside element {index}"
                              " (is it truncated?)", index)
                return
            c = scan.next_token()
            if c == b"]":
                break
            if c != b",":
                yield (self._over_budget() if c is False else Problem(
                    "invalid_json", "invalid JSON: the file ends inside the array" if c is None
                    else f"invalid JSON: expected ',' or ']' after the element {scan.at()}",
                    index))
                return
            scan.pos += 1
            index += 1
            expected = "a value"
        scan.pos += 1  # past the closing "]"
        c = scan.next_token()
        if c is False:
            yield self._over_budget()
        elif c is not None:
            yield Problem("invalid_json", f"invalid JSON: extra data after the array {scan.at()}")


def _too_long(line: bytes, max_line: int) -> bool:
    n = len(line)
    return n > max_line and not (n == max_line + 1 and line.endswith(b"\r"))


_IN_CONTAINER = re.compile(rb'["\[\]{}]')
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[\s,\]]")
_NOT_WS = re.compile(rb"[^ \t\r\n]")


class _Scanner:
    """A window on the array's bytes that grows by chunks as scanning needs them and drops what
    lies behind the current element. Tracks the line and column of `pos` for messages."""

    def __init__(self, buf: bytes, reader: FileReader, first_line: int) -> None:
        self.buf = buf
        self.pos = 0
        self.reader = reader
        self.line = first_line  # the line number of `mark`
        self.mark = 0  # a position in buf up to which lines have been counted
        self.line_start = 0  # offset (may be negative, before buf) of the current line's start
        self.exhausted = False
        self.over_budget = False

    def more(self, keep_from: int) -> bool:
        """Read another chunk, dropping the buffer before `keep_from`."""
        if self.exhausted:
            return False
        chunk = self.reader._read()
        if chunk is None:
            self.over_budget = self.exhausted = True
            return False
        if not chunk:
            self.exhausted = True
            return False
        self._count_lines(keep_from)
        self.buf = self.buf[keep_from:] + chunk
        self.pos -= keep_from
        self.mark -= keep_from
        self.line_start -= keep_from
        return True

    def _count_lines(self, upto: int) -> None:
        if upto > self.mark:
            n = self.buf.count(b"\n", self.mark, upto)
            if n:
                self.line += n
                self.line_start = self.buf.rfind(b"\n", self.mark, upto) + 1
            self.mark = upto

    def line_column(self) -> tuple[int, int]:
        self._count_lines(self.pos)
        return self.line, self.pos - self.line_start + 1

    def at(self) -> str:
        line, column = self.line_column()
        return f"at line {line} column {column}"

    def next_token(self) -> bytes | None | bool:
        """The next non-blank byte, at `pos`; None at the end of the file, False over budget."""
        while True:
            m = _NOT_WS.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos:self.pos + 1]
            self.pos = len(self.buf)
            if not self.more(self.pos):
                return False if self.over_budget else None

    def element(self) -> tuple[bytes | None, str | None, bool]:
        """The element starting at `pos`: (its bytes, None, False) or, when it is not held,
        (None, "too_long" or "too_deep", ...) ; the last item says whether the file ended
        inside it. Over budget: (None, "over_budget", True)."""
        max_line, max_depth = self.reader.max_line, self.reader.max_depth
        start = self.pos
        first = self.buf[start]
        depth, in_string, problem = 0, False, None
        if first in b"[{":
            depth, self.pos = 1, start + 1
        elif first == 34:  # '"'
            in_string, self.pos = True, start + 1
        while True:
            if in_string:
                m = _IN_STRING.search(self.buf, self.pos)
                if m and (m.group() == b'"' or m.end() < len(self.buf)):
                    if m.group() == b'"':
                        in_string, self.pos = False, m.end()
                        if depth == 0:
                            break
                    else:
                        self.pos = m.end() + 1  # past the escaped byte
                    continue
                self.pos = m.start() if m else len(self.buf)
            elif depth:
                m = _IN_CONTAINER.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    c = m.group()
                    if c == b'"':
                        in_string = True
                    elif c in b"[{":
                        depth += 1
                        if depth > max_depth and problem is None:
                            problem = "too_deep"
                    else:
                        depth -= 1
                        if depth == 0:
                            break
                    continue
                self.pos = len(self.buf)
            else:  # a number, true, false, null or garbage: ends at a blank, ',' or ']'
                m = _SCALAR_END.search(self.buf, self.pos)
                if m:
                    self.pos = m.start()
                    break
                self.pos = len(self.buf)
            # The element goes on past the buffer: read more, or stop holding it.
            if problem is not None or self.pos - start > max_line:
                problem = problem or "too_long"
                keep = self.pos
            else:
                keep = start
            if not self.more(keep):
                if self.over_budget:
                    return None, "over_budget", True
                return None, problem, depth > 0 or in_string
            start -= keep
            start = max(start, 0)
        if problem is None and self.pos - start > max_line:
            problem = "too_long"
        return (None if problem else self.buf[start:self.pos]), problem, False


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
