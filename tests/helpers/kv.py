"""A key-value bucket that counts its reads (how many a registry lookup costs)."""

from __future__ import annotations


class CountingKV:
    """The bucket, counting its reads."""

    def __init__(self, kv) -> None:
        self._kv, self.gets = kv, 0

    async def get(self, *args, **kwargs):
        self.gets += 1
        return await self._kv.get(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kv, name)
