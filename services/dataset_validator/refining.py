"""What happens to a good row on its way out: duplicate detection, the train/valid split and
length statistics, each in memory that does not grow with the rows (except the digests).

Every row is identified by the SHA-1 of (split seed, canonical JSON): bytes 0-7 place it in a
split, bytes 8-17 identify it for duplicate detection. SHA-1 serves only as a fast, well-spread
hash here (it is hardware-accelerated almost everywhere); nothing depends on it being secure.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from typing import BinaryIO

_BUCKETS = 1 << 16


def row_key(seed: int) -> bytes:
    """What every row's digest is salted with: `sha1(row_key(seed) + canonical_json)`."""
    return hashlib.sha256(f"tunebus split seed {seed}".encode()).digest()[:16]


class DigestSet:
    """Exact membership of row digests in about 9 bytes per row, where a Python set of them
    would take about 90: 65,536 byte strings, each the concatenated 8-byte keys of its rows,
    searched with bytes.find (at ten million rows a bucket holds ~1.2 kB)."""

    def __init__(self) -> None:
        self.buckets = [bytearray() for _ in range(_BUCKETS)]

    def add(self, digest: bytes) -> bool:
        """Add the row; False when it was already there."""
        key = digest[8:16]
        bucket = self.buckets[digest[16] << 8 | digest[17]]
        at = bucket.find(key)
        while at >= 0:
            if at & 7 == 0:
                return False
            at = bucket.find(key, at + 1)  # a match across two keys: keep looking
        bucket += key
        return True

    def __contains__(self, digest: bytes) -> bool:
        key = digest[8:16]
        bucket = self.buckets[digest[16] << 8 | digest[17]]
        at = bucket.find(key)
        while at >= 0:
            if at & 7 == 0:
                return True
            at = bucket.find(key, at + 1)
        return False


class Splitter:
    """Sends each row to train or valid by its digest, so the split is stable and needs no
    second pass: a row lands on the same side whatever else is in the file.

    Each side's first row is held back until the other side has one too. If one side would end
    up empty while the other has two or more rows, the other side's held row goes there
    instead, so any dataset of two or more rows has both (valid only when valid_fraction > 0)."""

    def __init__(self, train: BinaryIO | None, valid: BinaryIO | None, fraction: float) -> None:
        # Rows whose digest sorts below the threshold go to valid (bytes compare like numbers).
        if fraction >= 1:
            self.threshold = b"\xff" * 21  # above every 20-byte digest
        else:
            self.threshold = int(fraction * 2**64).to_bytes(8, "big")
        self.sinks = (train, valid)
        self.writes = tuple(_nothing if s is None else s.write for s in self.sinks)
        self.held: list[bytes | None] = [None, None]
        self.counts = [0, 0]
        self.settled = False  # both sides have a row: nothing is held any more

    def add(self, line: bytes, digest: bytes) -> None:
        """`line` ends with its newline."""
        side = digest < self.threshold  # False: train (0), True: valid (1)
        counts = self.counts
        counts[side] += 1
        if self.settled or counts[side] > 1:
            self.writes[side](line)
            return
        self.held[side] = line
        if counts[not side]:
            self._release()

    def finish(self) -> None:
        train, valid = self.counts
        if valid == 0 and train >= 2 and self.threshold != b"\0" * 8:
            self._move(0, 1)
        elif train == 0 and valid >= 2:
            self._move(1, 0)
        self._release()

    def _move(self, src: int, dst: int) -> None:
        self.held[dst], self.held[src] = self.held[src], None
        self.counts[src] -= 1
        self.counts[dst] += 1

    def _release(self) -> None:
        for side, line in enumerate(self.held):
            if line is not None:
                self.writes[side](line)
        self.held = [None, None]
        self.settled = True


def _nothing(line: bytes) -> None:
    """Where rows go when nobody keeps them (a check that writes nothing)."""


class LengthStats:
    """Row lengths in tokens: an exact histogram up to 65,535 (longer rows are kept aside as
    count, sum and maximum), so percentiles cost 512 kB however many rows there are."""

    CAP = 1 << 16

    def __init__(self) -> None:
        self.bins = array("Q", bytes(8 * self.CAP))
        self.long_count = self.long_total = self.long_max = 0

    def add(self, n: int) -> None:
        if n < self.CAP:
            self.bins[n] += 1
        else:
            self.add_long(n)

    def add_long(self, n: int) -> None:
        self.long_count += 1
        self.long_total += n
        self.long_max = max(self.long_max, n)

    def summary(self) -> dict[str, float] | None:
        count = sum(self.bins) + self.long_count
        if not count:
            return None
        total = sum(n * c for n, c in enumerate(self.bins) if c) + self.long_total
        longest = self.long_max or max(n for n, c in enumerate(self.bins) if c)
        return {
            "min": float(self._quantile(0.0, count)),
            "mean": round(total / count, 2),
            "p50": float(self._quantile(0.5, count)),
            "p95": float(self._quantile(0.95, count)),
            "max": float(longest),
        }

    def _quantile(self, q: float, count: int) -> int:
        """The smallest length with at least q of the rows at or below it (nearest rank)."""
        rank = max(1, math.ceil(q * count))
        seen = 0
        for length, n in enumerate(self.bins):
            seen += n
            if seen >= rank:
                return length
        return self.long_max  # among the long rows: the maximum is the best bound known
