"""Whether a service's consumers are moving: what `tunebus health` and `$SRV.STATS` report.

A consumer is stalled when
- its ack-pending count is at its `max_ack_pending`: JetStream delivers nothing more to it until
  some of those messages end (poison redelivered forever filled it, once); or
- it has a backlog, this instance is not working on any message, and nothing was delivered or
  acknowledged for `stall_after_s`: its pull loop is dead, or the server stopped serving it.

A busy instance with a backlog behind it (a trainer in an hour-long job) is not stalled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nats.js.errors import NotFoundError

from tunebus.contracts import subjects


@dataclass
class ConsumerWatch:
    stall_after_s: float
    # Per consumer: (delivered stream sequence, ack floor) as last seen, and since when.
    _seen: dict[str, tuple[tuple[int, int], float]] = field(default_factory=dict)

    def assess(self, durable: str, info: Any, busy: bool, now: float | None = None) -> str | None:
        """The problem with one consumer (its ConsumerInfo), or None."""
        now = time.monotonic() if now is None else now
        max_ack_pending = info.config.max_ack_pending or 0
        if max_ack_pending > 0 and info.num_ack_pending >= max_ack_pending:
            return (f"consumer {durable}: {info.num_ack_pending} messages awaiting an ack, its "
                    f"maximum: nothing more is delivered to it")
        position = (info.delivered.stream_seq or 0, info.ack_floor.stream_seq or 0)
        seen, since = self._seen.get(durable, (None, now))
        if position != seen or busy or not info.num_pending:
            self._seen[durable] = (position, now)
            return None
        if now - since >= self.stall_after_s:
            return (f"consumer {durable}: {info.num_pending} messages waiting and none delivered "
                    f"for {now - since:.0f}s while this instance is idle")
        return None

    async def problems(self, js: Any, durables: set[str], busy: bool) -> list[str]:
        found = []
        for durable in sorted(durables):
            try:
                info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
            except NotFoundError:
                continue  # not created yet (the subscriber starts after the service connects)
            if problem := self.assess(durable, info, busy):
                found.append(problem)
        return found
