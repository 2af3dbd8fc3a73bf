"""Fixtures shared by the tests: a real nats-server (JetStream, temp store dir, free port), a
real S3 HTTP endpoint (moto's server, free port), the four services as processes, and the tiny
model, on local disk and uploaded to S3 like any other model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from tunebus.contracts import subjects
from tunebus.shared.devstack.stack import Identities, LocalStack, start_servers
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The whole local stack, once per test session."""
    with LocalStack(tmp_path_factory.mktemp("stack"), settings=Settings(), reuse_external=False) as s:
        yield s


@pytest.fixture(scope="session")
def store(stack) -> ObjectStore:
    return ObjectStore(stack.settings.s3)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny model (seed 0) on local disk, read-only: generated once per session."""
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    return generate_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def write_rows(data_dir: Path, rows: list[dict], n_valid: int = 4) -> Path:
    """rows[:n_valid] as valid.jsonl and the rest as train.jsonl, the layout backends read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[n_valid:]), ("valid", rows[:n_valid])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return data_dir


@pytest.fixture(scope="session")
def tiny_model_uri(stack, store, tmp_path_factory) -> str:
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    local = generate_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
    uri = f"s3://{stack.settings.s3.models_bucket}/tiny-llama"
    store.put_dir(uri, local)
    return uri


@pytest.fixture(scope="session")
def _bare(tmp_path_factory):
    processes, admin, identities = start_servers(tmp_path_factory.mktemp("bare"))
    yield admin, identities
    for process in reversed(processes):
        process.stop()


@pytest.fixture(scope="session")
def bare_servers(_bare) -> Settings:
    """A nats-server and an S3 endpoint (streams and buckets declared, every role's user set up)
    without any tunebus service, for in-process tests: the admin's settings."""
    return _bare[0]


@pytest.fixture(scope="session")
def bare_roles(_bare) -> Identities:
    """Every role's credentials on `bare_servers` (`bare_roles.settings("trainer", settings)`)."""
    return _bare[1]


class EventLog:
    """Everything published under tunebus.v1.> while it listens, as (subject, decoded JSON)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict]] = []

    async def start(self, nc: nats.NATS) -> EventLog:
        async def record(msg):
            try:
                self.messages.append((msg.subject, json.loads(msg.data)))
            except ValueError:
                self.messages.append((msg.subject, {"raw": msg.data.decode(errors="replace")}))

        # The event and dead-letter subjects (what an observer may read), not request/reply traffic.
        self.subs = [await nc.subscribe(subject, cb=record)
                     for subject in (*subjects.EVENTS_STREAM_SUBJECTS, *subjects.DEAD_LETTER_STREAM_SUBJECTS)]
        return self

    def of_job(self, job_id: str, subject_suffix: str) -> list[dict]:
        return [
            body for subject, body in self.messages
            if subject.endswith(subject_suffix) and body.get("subject") == job_id
        ]

    async def wait_for(self, job_id: str, subject_suffix: str, timeout: float = 120.0) -> dict:
        """The first such event of the job; fails at once if the job ends some other way."""

        def arrived_or_ended():
            if found := self.of_job(job_id, subject_suffix):
                return found
            for end in self.ENDINGS:
                if end != subject_suffix and (ended := self.of_job(job_id, end)):
                    raise AssertionError(f"job {job_id} ended with {end}: {ended[0]['data']}")
            return None

        await wait_until(arrived_or_ended, timeout, f"no {subject_suffix} event for job {job_id}")
        return self.of_job(job_id, subject_suffix)[0]

    ENDINGS = (".dataset.rejected", ".training.failed", ".evaluation.failed",
               ".deadletter.dataset-validator", ".deadletter.trainer", ".deadletter.evaluator",
               ".deadletter.adapter-registry")


async def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


async def consumer_idle(nc: nats.NATS, durable: str, stream: str = "TUNEBUS_EVENTS") -> bool:
    """True when the durable consumer has nothing pending and nothing awaiting an ack."""
    info = await nc.jetstream().consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
def event_log_factory():
    return EventLog


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
