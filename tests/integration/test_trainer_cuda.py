"""The CUDA trainer variant as a worker process on a CPU-only torch: it announces what this
machine can do and refuses the rest with the reason, per the routing rules."""

from __future__ import annotations

import json
import uuid

import nats
import pytest
from tunebus.contracts import DatasetValidatedEvent
from tunebus.shared.bus import ensure_streams
from tunebus.shared.localstack import start_service

from tests.conftest import EventLog

from .test_trainer_resume import publish, resume_env, validated_event  # noqa: F401 (fixture)

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
    nc = await nats.connect(settings.nats_url)
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
