"""The registry's handlers, as logic: FastStream's TestNatsBroker and an in-memory bucket stand in
for NATS (tests/integration/test_registry_api.py runs the same API on a real server and S3). The
test broker acknowledges nothing, so a handler's PermanentError (dead-lettered on a real server)
reaches the publisher here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from faststream.nats import TestNatsBroker

from tunebus.contracts import (
    EvaluationFailed,
    EvaluationFailedEvent,
    TrainingCompleted,
    TrainingCompletedEvent,
    export,
    subjects,
)
from tunebus.services.adapter_registry import app
from tunebus.services.adapter_registry.registry import Registry
from tunebus.shared.bus import EVENTS
from tunebus.shared.delivery import PermanentError
from tunebus.shared.objectstore import ObjectNotFound

from tests.helpers.kv import MemoryBucket
from tests.helpers.services import service_in_memory

pytestmark = pytest.mark.anyio
EXAMPLE = Path(export.__file__).parent / "examples" / "v1" / "tunebus.training.completed.v1.json"
FILES = {"adapters.safetensors": b"mlx weights", "adapter_config.json": b"{}",
         "peft/adapter_model.safetensors": b"peft weights", "peft/adapter_config.json": b"{}",
         "metrics.json": b"{}"}


class Store:
    """The object store calls the registry makes, on objects in a dict; each object's recorded
    sha256 (x-amz-meta-sha256) is that of the bytes first put there."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.recorded: dict[str, str] = {}

    def put(self, files: dict[str, bytes]) -> None:
        for uri, body in files.items():
            self.recorded.setdefault(uri, hashlib.sha256(body).hexdigest())
        self.files |= files

    def stat(self, uri: str):
        if uri not in self.recorded:
            raise ObjectNotFound(uri)
        return SimpleNamespace(sha256=self.recorded[uri], size=len(self.files[uri]))

    def stream(self, uri: str, chunk: int):
        yield self.files[uri]

    def presigned_get(self, uri: str, expires) -> str:
        return f"https://s3.example/{uri.removeprefix('s3://')}?signed"


def completed(job_id: str, files: dict[str, bytes] = FILES, **changes) -> TrainingCompleted:
    data = json.loads(EXAMPLE.read_text())["data"]
    prefix = f"s3://tunebus-adapters/support-bot/{job_id}"
    data["job_id"] = data["request"]["job_id"] = job_id
    data |= {"adapter_uri": prefix, "layouts": {"mlx": "", "peft": "peft/"}, "format": "mlx",
             "artifacts": [{"name": name, "uri": f"{prefix}/{name}", "size": len(body),
                            "sha256": hashlib.sha256(body).hexdigest()}
                           for name, body in files.items()]}
    return TrainingCompleted.model_validate(data | changes)


def stored(done: TrainingCompleted) -> dict[str, bytes]:
    return {a.uri: FILES[a.name] for a in done.artifacts}


MLX_ONLY = {name: body for name, body in FILES.items() if not name.startswith("peft/")}


@pytest.fixture
def registry_bus():
    """(broker, registry, store, said): the registry's handlers on a test broker; `said` collects
    the AdapterRegistered events they publish."""
    store = Store()
    service = service_in_memory(app.NAME, store)
    service.settings.registry.gguf = False  # the GGUF copy reads real weights: tests/integration
    broker, registry = service.broker, Registry(MemoryBucket(), service.settings.registry)
    app.subscribe(service, registry)
    said: dict[str, list[dict]] = {"registered": []}

    @broker.subscriber(subjects.ADAPTER_REGISTERED, stream=EVENTS)
    async def registered(body: dict) -> None:
        said["registered"].append(body)

    return broker, registry, store, said


async def register(broker, store: Store, done: TrainingCompleted) -> None:
    store.put(stored(done))
    await broker.publish(TrainingCompletedEvent.wrap(done, source="tunebus/trainer").model_dump(mode="json"),
                         subjects.TRAINING_COMPLETED)
    failed = EvaluationFailed(job_id=done.job_id, adapter_name="support-bot", reason="no evaluator")
    await broker.publish(EvaluationFailedEvent.wrap(failed, source="tunebus/evaluator").model_dump(mode="json"),
                         subjects.EVALUATION_FAILED)


async def test_a_training_and_its_failed_evaluation_register_version_one(registry_bus):
    broker, registry, store, said = registry_bus
    async with TestNatsBroker(broker) as bus:
        await register(bus, store, completed("job-a"))
        reply = await (await bus.request({"ref": "support-bot"}, subjects.REGISTRY_GET)).decode()
    assert [e["data"]["entry"]["ref"] for e in said["registered"]] == ["support-bot:1"]
    assert reply["entry"]["version"] == 1 and reply["entry"]["verified_at"] is not None
    assert reply["entry"]["formats"] == {"mlx": "", "peft": "peft/"}


async def test_a_training_stored_outside_its_place_is_never_recorded(registry_bus):
    broker, registry, store, said = registry_bus
    forged = completed("job-b", adapter_uri="s3://tunebus-datasets/uploads/job-b")
    async with TestNatsBroker(broker) as bus:
        with pytest.raises(PermanentError, match="not registered: adapter_uri .* is not this adapter's place"):
            await bus.publish(TrainingCompletedEvent.wrap(forged, source="t").model_dump(mode="json"),
                              subjects.TRAINING_COMPLETED)
    assert "job.job-b" not in registry.kv.entries


async def test_bytes_that_differ_from_the_recorded_digest_are_not_registered(registry_bus):
    broker, registry, store, said = registry_bus
    done = completed("job-c")
    async with TestNatsBroker(broker) as bus:
        await register(bus, store, done)  # the first version, as recorded
        tampered = completed("job-d")
        store.put(stored(tampered))
        store.files[tampered.artifacts[0].uri] = b"other weights"  # after the trainer recorded it
        await bus.publish(TrainingCompletedEvent.wrap(tampered, source="t").model_dump(mode="json"),
                          subjects.TRAINING_COMPLETED)
        failed = EvaluationFailed(job_id="job-d", adapter_name="support-bot", reason="no evaluator")
        with pytest.raises(PermanentError, match="not registered: .*adapters.safetensors: the stored bytes"):
            await bus.publish(EvaluationFailedEvent.wrap(failed, source="t").model_dump(mode="json"),
                              subjects.EVALUATION_FAILED)
    assert await registry.version_of("job-d") is None
    assert [e["data"]["entry"]["ref"] for e in said["registered"]] == ["support-bot:1"]


async def test_a_download_of_one_layout_is_flat_and_a_missing_layout_names_those_there_are(registry_bus):
    broker, registry, store, said = registry_bus
    async with TestNatsBroker(broker) as bus:
        await register(bus, store, completed("job-e"))
        peft = await (await bus.request({"ref": "support-bot:1", "format": "peft"},
                                         subjects.REGISTRY_DOWNLOAD_URL)).decode()
        everything = await (await bus.request({"ref": "support-bot:1"},
                                              subjects.REGISTRY_DOWNLOAD_URL)).decode()
        await registry.delete("support-bot", 1, "test")
        gone = await (await bus.request({"ref": "support-bot:1", "format": "peft"},
                                        subjects.REGISTRY_DOWNLOAD_URL)).decode()
    assert set(peft["urls"]) == {"adapter_model.safetensors", "adapter_config.json", "metrics.json"}
    assert peft["uris"]["adapter_config.json"].endswith("/peft/adapter_config.json")
    assert set(everything["urls"]) == set(FILES) and everything["error"] is None
    assert gone["error"] == "support-bot:1 is deleted" and gone["urls"] == {}


async def test_a_download_in_a_layout_not_stored_is_an_error_naming_the_stored_ones(registry_bus):
    broker, registry, store, said = registry_bus
    async with TestNatsBroker(broker) as bus:
        await register(bus, store, completed("job-f", MLX_ONLY, layouts={"mlx": ""}))
        reply = await (await bus.request({"ref": "support-bot:1", "format": "peft"},
                                         subjects.REGISTRY_DOWNLOAD_URL)).decode()
    assert reply["error"] == "support-bot:1 is not stored in the peft layout; it has: mlx"
    assert reply["formats"] == {"mlx": ""} and reply["urls"] == {}


async def test_deleting_needs_a_version_and_a_bad_request_names_its_field(registry_bus):
    broker, registry, store, said = registry_bus
    async with TestNatsBroker(broker) as bus:
        await register(bus, store, completed("job-g"))
        whole = await (await bus.request({"ref": "support-bot"}, subjects.REGISTRY_DELETE)).decode()
        unreadable = await (await bus.request({"limit": "many"}, subjects.REGISTRY_LIST)).decode()
    assert whole["error"].startswith("delete needs name:version, not 'support-bot'")
    assert not (await registry.get("support-bot", 1)).deleted
    assert unreadable["error"].startswith(f"invalid request on {subjects.REGISTRY_LIST}: limit:")
