"""The registry's key-value records on a real JetStream: versions are never lost or doubled."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import nats
import pytest

from tunebus.contracts import TrainingCompleted
from tunebus.services.adapter_registry.registry import NotYetKnown, Registry

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"


def training(job_id: str, name: str) -> TrainingCompleted:
    data = json.loads(EXAMPLE.read_text())["data"]
    data["job_id"] = data["request"]["job_id"] = job_id
    data["request"]["adapter_name"] = name
    return TrainingCompleted.model_validate(data)


async def open_registry(nats_url: str, bucket: str) -> tuple[nats.NATS, Registry]:
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().create_key_value(bucket=bucket, history=5)
    return nc, Registry(kv)


async def test_concurrent_registrations_keep_every_version(bare_servers):
    bucket = f"registry-{uuid.uuid4().hex[:8]}"
    name = "racer"
    # Two registrars on two connections, as two registry replicas would be.
    (nc1, one), (nc2, two) = [await open_registry(bare_servers.nats_url, bucket) for _ in range(2)]
    try:
        jobs = [f"job-{i}" for i in range(12)]
        for job in jobs:
            await one.record_training(training(job, name))
        entries = await asyncio.gather(*[
            (one if i % 2 else two).register(job, None) for i, job in enumerate(jobs)
        ])
        assert sorted(e.version for e in entries) == list(range(1, 13))
        assert {e.job_id: e.version for e in entries} == {
            e.job_id: e.version for e in await one.list(name=name)}
    finally:
        await nc1.close()
        await nc2.close()


async def test_registering_the_same_job_twice_gives_the_same_version(bare_servers):
    nc, registry = await open_registry(bare_servers.nats_url, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        await registry.record_training(training("job-a", "twice"))
        first = await registry.register("job-a", None)
        again = await registry.register("job-a", None)
        assert (first.version, again.version) == (1, 1)
        await registry.record_training(training("job-b", "twice"))
        assert (await registry.register("job-b", None)).version == 2
        assert (await registry.get("twice")).version == 2
    finally:
        await nc.close()


async def test_an_evaluation_before_its_training_is_retried_later(bare_servers):
    nc, registry = await open_registry(bare_servers.nats_url, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(NotYetKnown):
            await registry.register("job-early", None)
        with pytest.raises(KeyError):
            await registry.get("nothing-here")
    finally:
        await nc.close()
