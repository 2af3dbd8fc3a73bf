"""Key-value buckets for tests: one that counts its reads (how many a registry lookup costs), and
one in memory for handler-logic tests with FastStream's TestNatsBroker (no server)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError


class CountingKV:
    """The bucket, counting its reads."""

    def __init__(self, kv) -> None:
        self._kv, self.gets = kv, 0

    async def get(self, *args, **kwargs):
        self.gets += 1
        return await self._kv.get(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kv, name)


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class MemoryKV:
    """The KeyValue calls tunebus makes (get, put, create, update, delete), with revisions and
    nats-py's errors, in a dict."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.revision = 0

    async def get(self, key: str) -> Entry:
        if key not in self.entries:
            raise KeyNotFoundError
        return self.entries[key]

    async def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = Entry(key, value, self.revision)
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        if key in self.entries:
            raise KeyWrongLastSequenceError(description=f"{key} exists")
        return await self.put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        current = self.entries.get(key)
        if current is None or current.revision != last:
            raise KeyWrongLastSequenceError(description=f"{key} is not at revision {last}")
        return await self.put(key, value)

    async def delete(self, key: str) -> None:
        self.entries.pop(key, None)


class MemoryBucket:
    """A tunebus.shared.bus.Bucket, opened, in memory: `kv` and the stream's subject index."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.kv = MemoryKV()
        self.js = self

    async def stream_info(self, stream: str, subjects_filter: str) -> SimpleNamespace:
        prefix = subjects_filter.removesuffix(">")
        subjects = {f"$KV.{self.name}.{key}": 1 for key in self.kv.entries
                    if f"$KV.{self.name}.{key}".startswith(prefix)}
        return SimpleNamespace(state=SimpleNamespace(subjects=subjects))
