"""Fixtures several integration modules share."""

from __future__ import annotations

import json

import pytest
from tunebus.shared.objectstore import ObjectStore

from tests.helpers.bus import connect
from tests.helpers.events import EventLog
from tests.helpers.trainer_events import ROWS


@pytest.fixture(scope="module")
def resume_env(bare_servers, tmp_path_factory):
    """The bare servers with the tiny model and a dataset's splits in S3."""
    from tunebus.shared.devstack.tinymodel import generate_tiny_model

    settings = bare_servers.model_copy(update={"work_dir": tmp_path_factory.mktemp("trainer-work")})
    store = ObjectStore(settings.s3)
    model_uri = f"s3://{settings.s3.models_bucket}/tiny-llama-resume"
    store.put_dir(model_uri, generate_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))
    splits = {}
    for name, rows in (("train", ROWS[4:]), ("valid", ROWS[:4])):
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        splits[name] = store.put_bytes(f"s3://{settings.s3.datasets_bucket}/resume/{name}.jsonl", body)
    return settings, model_uri, splits, tmp_path_factory.mktemp("trainer-logs")


@pytest.fixture
async def bus(stack):
    """A connection as the stack's client, and an EventLog of every event it sees."""
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    yield nc, events
    await nc.close()
