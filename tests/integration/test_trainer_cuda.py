"""The CUDA trainer variant as a worker process on a CPU-only torch: it announces what this
machine can do and refuses the rest with the reason, per the routing rules."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import pytest
from tests.helpers.bus import connect
from tunebus.contracts import DatasetValidatedEvent
from tunebus.shared.bus import ensure_streams
from tunebus.shared.devstack.stack import start_service

from tests.helpers.events import EventLog
from tests.helpers.trainer_events import publish, validated_event

pytestmark = pytest.mark.anyio


def with_request(event: DatasetValidatedEvent, **changes) -> DatasetValidatedEvent:
    body = json.loads(event.model_dump_json())
    for path, value in changes.items():
        target = body["data"]["request"]
        *parents, leaf = path.split("__")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return DatasetValidatedEvent.model_validate(body)


async def test_a_cpu_cuda_worker_refuses_qlora_with_the_reason(resume_env):
    settings, model_uri, splits, logs = resume_env
    nc = await connect(settings)
    await ensure_streams(nc)
    events = await EventLog().start(nc)
    worker = start_service("trainer", settings, logs, {"TUNEBUS_TRAINER__BACKEND": "cuda"})
    try:
        job_id = f"qlora-on-cpu-{uuid.uuid4().hex[:8]}"
        event = with_request(validated_event(job_id, model_uri, splits, "cuda"),
                             adapter__quantization="4bit")
        await publish(nc, event)
        failed = (await events.wait_for(job_id, ".training.failed", timeout=120))["data"]
        assert ("quantization '4bit' is not supported by the cuda worker (supported: none): "
                "quantization '4bit' needs a CUDA GPU") in failed["reason"]
        assert not events.of_job(job_id, ".training.started")
    finally:
        worker.stop()
        await nc.close()


async def test_a_cuda_trained_adapter_is_evaluated_and_registered_in_both_layouts(
        stack, store, tiny_model_uri, tmp_path):
    """The whole pipeline with the CUDA variant (on a CPU-only torch) as the only worker that
    can serve the request: validated, trained, evaluated, registered, downloadable as PEFT and
    as MLX."""
    from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows

    s3 = stack.settings.s3
    job_id = f"cuda-e2e-{uuid.uuid4().hex[:8]}"
    dataset_uri = upload_rows(store, s3.datasets_bucket, f"uploads/{job_id}/adder.jsonl", SAMPLE_ROWS)
    body = json.loads(training_request(job_id, dataset_uri, tiny_model_uri))
    body["data"]["backend"] = "cuda"
    body["data"]["hyperparameters"]["iters"] = 20
    worker = start_service("trainer", stack.settings, tmp_path, {"TUNEBUS_TRAINER__BACKEND": "cuda"})
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await cuda_worker_announced(nc)  # else the MLX worker finds no one to leave the job to
        await publish_request(nc, json.dumps(body).encode())
        completed = (await events.wait_for(job_id, ".training.completed", timeout=300))["data"]
        assert completed["backend"] == "cuda"
        assert completed["metrics"]["final_loss"] < completed["metrics"]["first_loss"]
        evaluation = (await events.wait_for(job_id, ".evaluation.completed", timeout=300))["data"]
        assert evaluation["after"]["loss"] < evaluation["before"]["loss"]
        entry = (await events.wait_for(job_id, ".adapter.registered", timeout=120))["data"]["entry"]
        assert entry["backend"] == "cuda" and entry["formats"] == {"mlx": "", "peft": "peft/", "gguf": "gguf/"}
        for layout, weights in (("peft", "adapter_model.safetensors"), ("mlx", "adapters.safetensors")):
            reply = await nc.request("tunebus.v1.registry.download-url", json.dumps(
                {"ref": entry["ref"], "format": layout}).encode(), timeout=10)
            urls = json.loads(reply.data)
            assert urls["format"] == layout and {weights, "adapter_config.json"} <= set(urls["urls"])
        config = json.loads(store.open(f"{completed['adapter_uri']}/peft/adapter_config.json").read())
        assert config["base_model_name_or_path"] == tiny_model_uri
    finally:
        worker.stop()
        await nc.close()


async def cuda_worker_announced(nc: nats.NATS, timeout: float = 90.0) -> None:
    from tunebus.services.trainer.routing import running_trainers

    deadline = asyncio.get_running_loop().time() + timeout
    while not any(c.backend == "cuda" for c in await running_trainers(nc, "trainer", 0.3)):
        assert asyncio.get_running_loop().time() < deadline, "no cuda trainer announced itself"
