"""A service frame for handler-logic tests: a real broker (for FastStream's TestNatsBroker), job
claims in an in-memory bucket, and whatever object store the test hands in."""

from __future__ import annotations

from faststream import FastStream

from tunebus.shared import jobs
from tunebus.shared.bus import create_broker
from tunebus.shared.service import Service
from tunebus.shared.settings import Settings

from tests.helpers.kv import MemoryBucket


def service_in_memory(name: str, store, settings: Settings | None = None) -> Service:
    settings = settings or Settings()
    broker, _ = create_broker(settings, name)
    return Service(name, settings, broker, FastStream(broker), store,
                   jobs.JobClaims(MemoryBucket(jobs.BUCKET)))
