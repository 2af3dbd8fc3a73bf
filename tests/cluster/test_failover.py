"""Beyond one machine: a 3-node JetStream cluster on loopback (routes on free ports, a store per
node), streams and buckets with three replicas, the services connected to all three servers.
A job survives losing the node that leads its stream, and a trainer, at the same moment."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from tests.helpers.bus import connect
from tests.helpers.events import StoredEvents, consumer_idle, publish_raw
from tunebus.contracts import subjects
from tunebus.shared.cli.client import discover
from tunebus.shared.devstack.stack import LocalStack, restart_cluster_node
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import JetStreamSettings, Settings

pytestmark = pytest.mark.anyio

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(1, 9) for b in range(1, 5)]
TRAINER_ENV = {"TUNEBUS_TRAINER__CHECKPOINT_EVERY": "10", "TUNEBUS_TRAINER__PROGRESS_INTERVAL_S": "0.5",
               "TUNEBUS_DELIVERY__ACK_WAIT_S": "10", "TUNEBUS_DELIVERY__HEARTBEAT_S": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    settings = Settings(jetstream=JetStreamSettings(replicas=3))
    with pytest.MonkeyPatch.context() as env:
        for key, value in TRAINER_ENV.items():
            env.setenv(key, value)
        with LocalStack(tmp_path_factory.mktemp("cluster"), settings=settings, reuse_external=False,
                        cluster_size=3) as stack:
            operator = stack.as_role("operator")
            ObjectStore(operator.s3).put_dir("s3://tunebus-models/tiny-llama", tiny_model)
            yield stack


async def stream_leader(nc, stream: str) -> str | None:
    try:
        info = await nc.jetstream().stream_info(stream)
    except Exception:
        return None
    return info.cluster.leader if info.cluster else None


async def test_streams_and_buckets_are_replicated_on_three_nodes(cluster):
    nc = await connect(cluster.settings)
    try:
        js = nc.jetstream()
        for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM,
                       f"KV_{subjects.JOBS_BUCKET}", f"KV_{subjects.REGISTRY_BUCKET}"):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster.leader and len(info.cluster.replicas or []) == 2, stream
    finally:
        await nc.close()


async def test_a_job_survives_killing_its_stream_leader_and_its_trainer(cluster):
    stack = cluster
    submitter = stack.as_role("submitter")
    job_id = f"failover-{uuid.uuid4().hex[:8]}"
    dataset_uri = f"s3://tunebus-datasets/uploads/{job_id}/adder.jsonl"
    ObjectStore(submitter.s3).put_bytes(dataset_uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    nc = await connect(stack.settings, max_reconnect_attempts=-1)
    events = await StoredEvents().start(stack.settings)
    try:
        body = json.dumps({
            "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/cluster",
            "type": "tunebus.training.requested.v1", "subject": job_id,
            "data": {"job_id": job_id, "adapter_name": "failover", "base_model": "s3://tunebus-models/tiny-llama",
                     "dataset": {"uri": dataset_uri}, "evaluation": {"enabled": False},
                     "hyperparameters": {"iters": 60, "batch_size": 4, "learning_rate": 0.005,
                                         "max_seq_length": 64, "seed": 1}},
        }).encode()
        await publish_raw(nc, subjects.TRAINING_REQUESTED, body, json.loads(body)["id"])
        deadline = time.monotonic() + 180
        while not any(p["data"]["step"] > 10 for p in events.of(job_id, ".training.progress")):
            assert time.monotonic() < deadline, "training never got past its first checkpoint"
            await asyncio.sleep(0.2)

        leader = await stream_leader(nc, subjects.EVENTS_STREAM)
        node = next(p for p in stack.processes if p.name == f"nats-server-{leader.rsplit('-', 1)[1]}")
        node.kill()                      # SIGKILL the node that leads TUNEBUS_EVENTS …
        stack.service("trainer").kill()  # … and the worker training the job, at the same moment
        killed_at = time.monotonic()
        while (new := await stream_leader(nc, subjects.EVENTS_STREAM)) in (None, leader):
            assert time.monotonic() - killed_at < 60, "no new stream leader within 60 s"
            await asyncio.sleep(0.05)
        leaderless_s = time.monotonic() - killed_at
        stack.restart("trainer")

        registered = await events.wait_for(job_id, ".adapter.registered", timeout=300)
        # A second training or registration would be in flight until these are idle.
        for durable in ("trainer-mlx", "adapter-registry-training"):
            while not await consumer_idle(nc, durable):
                assert time.monotonic() - killed_at < 300, f"{durable} still busy"
                await asyncio.sleep(0.2)
        assert len(events.of(job_id, ".adapter.registered")) == 1
        assert len(events.of(job_id, ".training.completed")) == 1
        steps = [p["data"]["step"] for p in events.of(job_id, ".training.progress")]
        assert len(steps) == len(set(steps)), f"a progress step was stored twice: {sorted(steps)}"
        assert not [s for s, b in events.messages if ".deadletter." in s and b.get("data", {}).get("job_id") == job_id]
        started = events.of(job_id, ".training.started")
        assert started[-1]["data"]["resumed_from_step"] in (10, 20, 30, 40, 50)
        assert registered[0]["data"]["entry"]["job_id"] == job_id
        print(f"\nstream {subjects.EVENTS_STREAM}: leader {leader} killed, {new} led after "
              f"{leaderless_s:.2f} s; resumed from step {started[-1]['data']['resumed_from_step']}")

        # The killed node comes back on its own store and catches up.
        index = stack.processes.index(node)
        stack.processes[index] = restart_cluster_node(stack.data_dir / "cluster", node)
    finally:
        await events.close()
        await nc.close()


async def test_two_trainers_share_the_queue_and_train_each_job_once(cluster, tmp_path):
    """More workers, more throughput: with a second trainer on the same durable consumer, queued
    jobs are spread over both, and the claims keep each job to one training."""
    from tunebus.shared.devstack.stack import start_service

    stack = cluster
    submitter = stack.as_role("submitter")
    second = start_service("trainer", stack.as_role("trainer"), tmp_path)
    nc = await connect(stack.settings)
    events = await StoredEvents().start(stack.settings)
    jobs = [f"shared-{n}-{uuid.uuid4().hex[:6]}" for n in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len([i for i in await discover(nc, wait=0.5) if i.get("name") == "trainer"]) < 2:
            assert time.monotonic() < deadline, "the second trainer never announced itself"
        dataset_uri = "s3://tunebus-datasets/uploads/shared/adder.jsonl"
        ObjectStore(submitter.s3).put_bytes(dataset_uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
        for job_id in jobs:
            body = json.dumps({
                "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/cluster",
                "type": "tunebus.training.requested.v1", "subject": job_id,
                "data": {"job_id": job_id, "adapter_name": "shared",
                         "base_model": "s3://tunebus-models/tiny-llama", "dataset": {"uri": dataset_uri},
                         "evaluation": {"enabled": False},
                         "hyperparameters": {"iters": 20, "batch_size": 4, "max_seq_length": 64}},
            }).encode()
            await publish_raw(nc, subjects.TRAINING_REQUESTED, body, json.loads(body)["id"])
        for job_id in jobs:
            await events.wait_for(job_id, ".adapter.registered", timeout=300)
        for job_id in jobs:
            assert len(events.of(job_id, ".training.completed")) == 1
        trained_here = set(jobs) & completed_in(second.log_path)
        assert 0 < len(trained_here) < len(jobs), f"the second trainer trained {sorted(trained_here)}"
    finally:
        second.stop()
        await events.close()
        await nc.close()


def completed_in(log_path) -> set[str]:
    """The job ids a trainer's log says it finished training."""
    done = set()
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "training completed":
            done.add(record.get("job_id"))
    return done
