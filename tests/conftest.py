"""Fixtures shared by the tests: a real nats-server (JetStream, temp store dir, free port), a
real S3 HTTP endpoint (moto's server, free port), the four services as processes, and the tiny
model, on local disk and uploaded to S3 like any other model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One BLAS/OpenMP thread for every process the tests start (the services, trainer ranks and this
# one inherit it). The tiny model gains nothing from a second thread, and on a two-core machine
# that also runs nats-server, moto and other services, torch's threads wait on each other at
# every op: a 60-step LoRA run of the tiny model took 75 s with two threads, 8 s with one,
# same losses. torch reads it when imported; a torch already imported is set here too.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

import pytest
from tunebus.shared.devstack.stack import Identities, LocalStack, start_servers
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

from tests.helpers.events import EventLog


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


@pytest.fixture
def event_log_factory():
    return EventLog


