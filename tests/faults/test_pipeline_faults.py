"""The whole pipeline while something breaks: poison floods the validator, S3 goes away for 10 s
(mid-training, and during validation), nats-server is killed with SIGKILL mid-training. Each
time the job must end as it would have without the fault, with exactly one registration.

One stack for the module (nats-server on its own store, moto's S3 behind a TcpProxy that the
tests cut, the four services); each test restores what it broke. A trainer killed mid-run is
tests/integration/test_trainer_resume.py's case.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
import uuid

import pytest
from tunebus.contracts import subjects
from tunebus.shared.devstack.stack import LocalStack, start_nats, start_s3
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import S3Settings, Settings

from tests.helpers.events import consumer_idle, wait_until
from tests.helpers.bus import connect
from tests.helpers.events import StoredEvents, publish_raw
from tests.helpers.faults import TcpProxy, cut_for, poison

pytestmark = pytest.mark.anyio

SERVICE_ENV = {
    "TUNEBUS_DELIVERY__ACK_WAIT_S": "10",
    "TUNEBUS_DELIVERY__HEARTBEAT_S": "1",
    "TUNEBUS_DELIVERY__RETRY_BASE_DELAY_S": "0.5",
    "TUNEBUS_TRAINER__CHECKPOINT_EVERY": "10",
    "TUNEBUS_TRAINER__PROGRESS_INTERVAL_S": "0.5",
    # Shorter than the outages below: a service waits S3 out for 4 s, then hands the message
    # back, and its next delivery carries on (a training from its last checkpoint).
    "TUNEBUS_S3__RETRY_FOR_S": "4",
}
ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(1, 9) for b in range(1, 5)]
CONSUMERS = ("dataset-validator", "trainer-mlx", "evaluator", "adapter-registry-training",
             "adapter-registry-evaluation")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The stack, its S3 proxy, and the tiny model and a dataset in S3."""
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    s3_process, endpoint = start_s3()
    parts = urllib.parse.urlsplit(endpoint)
    with pytest.MonkeyPatch.context() as env, TcpProxy(parts.hostname, parts.port) as proxy:
        for key in [k for k in os.environ if k.startswith("TUNEBUS_")]:
            env.delenv(key)
        for key, value in SERVICE_ENV.items():
            env.setenv(key, value)
        env.setenv("TUNEBUS_S3__ENDPOINT", proxy.url)  # the stack uses this S3, not one of its own
        settings = Settings(s3=S3Settings(endpoint=proxy.url, access_key="faults",
                                          secret_key="faults-secret", retry_for_s=30))
        store = ObjectStore(settings.s3)
        store.ensure_buckets()
        model_uri = f"s3://{settings.s3.models_bucket}/tiny-faults"
        store.put_dir(model_uri, generate_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))
        dataset_uri = f"s3://{settings.s3.datasets_bucket}/uploads/faults/adder.jsonl"
        store.put_bytes(dataset_uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
        try:
            with LocalStack(tmp_path_factory.mktemp("faults"), settings=settings) as stack:
                yield stack, proxy, model_uri, dataset_uri
        finally:
            s3_process.stop()


def request(job_id: str, model_uri: str, dataset_uri: str, iters: int = 40) -> dict:
    return {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/faults",
        "type": "tunebus.training.requested.v1", "subject": job_id,
        "data": {"job_id": job_id, "adapter_name": "faults", "base_model": model_uri,
                 "dataset": {"uri": dataset_uri}, "evaluation": {"enabled": False},
                 "hyperparameters": {"iters": iters, "batch_size": 4, "learning_rate": 0.005,
                                     "max_seq_length": 64, "seed": 1}},
    }


@pytest.fixture
async def bus(faulty):
    stack = faulty[0]
    nc = await connect(stack.settings, max_reconnect_attempts=-1)
    events = await StoredEvents().start(stack.settings)
    yield nc, events
    await events.close()
    await nc.close()


async def submit(nc, job: dict) -> float:
    await publish_raw(nc, subjects.TRAINING_REQUESTED, json.dumps(job).encode(), job["id"])
    return time.monotonic()


async def finished_once(nc, events: StoredEvents, job_id: str) -> None:
    """The job registered, every consumer idle after it, and nothing of it said twice."""
    await events.wait_for(job_id, ".adapter.registered", timeout=240)
    for durable in CONSUMERS:
        deadline = time.monotonic() + 60
        while not await consumer_idle(nc, durable):
            assert time.monotonic() < deadline, f"{durable} still busy"
            await asyncio.sleep(0.2)
    for suffix in (".training.completed", ".adapter.registered"):
        assert len(events.of(job_id, suffix)) == 1, suffix
    assert not events.of(job_id, ".training.failed")
    assert not [s for s, b in events.messages
                if s.startswith(subjects.DEAD_LETTER) and b.get("subject") == job_id]


async def test_a_valid_job_after_a_thousand_poison_messages_starts_within_seconds(faulty, bus):
    stack, _, model_uri, dataset_uri = faulty
    nc, events = bus
    job_id = f"after-poison-{uuid.uuid4().hex[:8]}"
    job = request(job_id, model_uri, dataset_uri)
    kinds = poison(json.dumps(request("poisoned", model_uri, dataset_uri)).encode())
    ids = {}
    for n in range(1000):
        kind = list(kinds)[n % len(kinds)]
        ids[f"poison-{job_id}-{n}"] = kind
        await publish_raw(nc, subjects.TRAINING_REQUESTED, kinds[kind], f"poison-{job_id}-{n}")
    published = await submit(nc, job)

    await events.wait_for(job_id, ".dataset.validated", timeout=120)
    waited = time.monotonic() - published
    print(f"\nthe valid job was validated {waited:.1f}s after it was published behind 1,000 poison messages")
    letters = {b["data"]["headers"].get("Nats-Msg-Id"): b["data"] for s, b in events.messages
               if s == subjects.dead_letter("dataset-validator")}
    assert set(ids) <= set(letters), f"{len(set(ids) - set(letters))} poison messages not dead-lettered"
    assert all(letters[i]["reason"] and letters[i]["deliveries"] == 1 for i in ids)
    assert waited < 60
    await finished_once(nc, events, job_id)


async def test_s3_cut_for_ten_seconds_mid_training_hands_the_job_back_to_resume_from_its_checkpoint(
        faulty, bus):
    stack, proxy, model_uri, dataset_uri = faulty
    nc, events = bus
    job_id = f"s3-training-{uuid.uuid4().hex[:8]}"
    await submit(nc, request(job_id, model_uri, dataset_uri, iters=80))
    await wait_until(lambda: any(p["data"]["step"] > 10 for p in events.of(job_id, ".training.progress")),
                     180, "training past its first checkpoint")
    before = s3_retries(stack, "trainer")
    outage = cut_for(proxy, 10.0)
    try:
        await finished_once(nc, events, job_id)
    finally:
        outage.join()
        proxy.restore()
    assert s3_retries(stack, "trainer") > before  # the outage did reach the trainer
    starts = [e["data"] for e in events.of(job_id, ".training.started")]
    assert len(starts) >= 2 and starts[-1]["resumed_from_step"] >= 10, starts
    completed = events.of(job_id, ".training.completed")[0]["data"]
    assert completed["metrics"]["resumed_from_step"] == starts[-1]["resumed_from_step"]


async def test_s3_cut_for_ten_seconds_during_validation_does_not_reject_the_job(faulty, bus):
    stack, proxy, model_uri, dataset_uri = faulty
    nc, events = bus
    job_id = f"s3-validation-{uuid.uuid4().hex[:8]}"
    before = s3_retries(stack, "dataset_validator")
    outage = cut_for(proxy, 10.0)
    try:
        await submit(nc, request(job_id, model_uri, dataset_uri, iters=10))
        await finished_once(nc, events, job_id)
    finally:
        outage.join()
        proxy.restore()
    assert not events.of(job_id, ".dataset.rejected")
    assert s3_retries(stack, "dataset_validator") > before


def s3_retries(stack, service: str) -> int:
    """How often the service's log says it retried an S3 call."""
    return stack.service(service).log_path.read_text().count("S3 unreachable; retrying")


async def test_nats_killed_mid_training_and_restarted_on_its_store_registers_once(faulty, bus):
    stack, _, model_uri, dataset_uri = faulty
    nc, events = bus
    job_id = f"nats-killed-{uuid.uuid4().hex[:8]}"
    await submit(nc, request(job_id, model_uri, dataset_uri, iters=60))
    await wait_until(lambda: any(p["data"]["step"] >= 10 for p in events.of(job_id, ".training.progress")),
                     180, "training under way")
    server = next(p for p in stack.processes if p.name == "nats-server")
    server.kill()  # SIGKILL
    port = int(stack.settings.nats_url.rsplit(":", 1)[1])
    restarted, _ = start_nats(stack.data_dir / "jetstream", stack.identities.nats_passwords, port)
    stack.processes[stack.processes.index(server)] = restarted
    await finished_once(nc, events, job_id)
