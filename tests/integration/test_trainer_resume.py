"""True resume: a trainer process killed with SIGKILL mid-run leaves its job to JetStream, which
redelivers it; the next trainer process continues from the latest checkpoint in S3 and ends as
an uninterrupted run with the same seed does.

The trainers here are processes of their own on the bare servers (no other services), with a
short ack wait so that redelivery after the kill comes in seconds, not a minute. Both variants:
MLX, and the CUDA variant on a CPU-only torch (its checkpoints are the Hugging Face Trainer's,
written as safetensors), in one process and over two (DDP over gloo): there the killed worker's
ranks stop by themselves, and the next worker's two ranks resume the two-process checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path

import nats
import pytest
from tests.helpers.bus import connect
from tunebus.contracts import DatasetValidatedEvent
from tunebus.shared.bus import ensure_streams
from tunebus.shared.devstack.stack import start_service
from tunebus.shared.objectstore import ObjectStore

from tests.helpers.events import EventLog, consumer_idle, wait_until
from tests.helpers.trainer_events import publish, validated_event

pytestmark = pytest.mark.anyio

TRAINER_ENV = {
    "TUNEBUS_DELIVERY__ACK_WAIT_S": "5",
    "TUNEBUS_DELIVERY__HEARTBEAT_S": "0.5",
    "TUNEBUS_TRAINER__CHECKPOINT_EVERY": "20",
}


@pytest.mark.parametrize(("backend", "processes"), [("mlx", 1), ("cuda", 1), ("cuda", 2)],
                         ids=["mlx", "cuda", "cuda-2-processes"])
async def test_a_trainer_killed_mid_run_is_resumed_from_its_checkpoint_by_the_next(
        resume_env, tmp_path, backend, processes):
    settings, model_uri, splits, logs = resume_env
    nc = await connect(settings)
    await ensure_streams(nc)
    events = await EventLog().start(nc)
    job_id = f"killed-{backend}-{uuid.uuid4().hex[:8]}"
    event = validated_event(job_id, model_uri, splits, backend)
    env = TRAINER_ENV | {"TUNEBUS_TRAINER__BACKEND": backend,
                         "TUNEBUS_TRAINER__PROCESSES": str(processes)}
    # Two workers on one durable consumer, started together so that both pay their start-up
    # (seconds of imports) at once: one takes the job, the other is warm when it is redelivered.
    # Each has a work directory of its own; the one holding the job's is the one training it.
    work_dirs = [tmp_path / f"worker-{n}" for n in range(2)]
    workers = [start_service("trainer", settings, logs, env | {"TUNEBUS_WORK_DIR": str(work_dir)})
               for work_dir in work_dirs]
    try:
        await publish(nc, event)
        await events.wait_for(job_id, ".training.progress", timeout=120)
        # Progress past step 20 means the checkpoint of step 20 is in S3.
        await wait_until(lambda: any(p["data"]["step"] > 20 for p in events.of_job(job_id, ".training.progress")),
                         120, "progress past step 20")
        training = [(work_dir / "jobs" / job_id).exists() for work_dir in work_dirs]
        assert sum(training) == 1, f"job directories: {training}"
        first, second = workers if training[0] else workers[::-1]
        first.kill()  # SIGKILL: no shutdown, no hand-back, the message stays unacknowledged
        assert not events.of_job(job_id, ".training.completed")
        # Its ranks (if any) see their worker gone before their next step and end.
        await wait_until(lambda: not ranks_of(first.proc.pid), 60, "the killed worker's ranks end")

        completed = (await events.wait_for(job_id, ".training.completed", timeout=180))["data"]
        starts = [e["data"] for e in events.of_job(job_id, ".training.started")]
        assert starts[0]["resumed_from_step"] is None
        resumed_from = starts[-1]["resumed_from_step"]
        assert resumed_from in (20, 40)
        assert starts[-1]["checkpoint_uri"].endswith(f"/checkpoints/step-{resumed_from:07d}")
        assert completed["metrics"]["resumed_from_step"] == resumed_from
        assert starts[-1]["resolved_args"].get("world_size", 1) == processes
        steps = [p["data"]["step"] for p in events.of_job(job_id, ".training.progress")
                 if p["data"].get("train_loss") is not None]
        await wait_until_idle(nc, f"trainer-{backend}")
        assert len(events.of_job(job_id, ".training.completed")) == 1
    finally:
        for worker in workers:
            worker.stop()
        await nc.close()

    # The same run, uninterrupted, here in the test process: same losses, same weights.
    uninterrupted = await asyncio.to_thread(train_uninterrupted, settings, event, tmp_path, backend,
                                            processes)
    assert completed["metrics"]["final_loss"] == pytest.approx(uninterrupted.final_loss, abs=1e-5)
    assert completed["metrics"]["trained_tokens"] == uninterrupted.trained_tokens
    assert json.loads(read(settings, completed, "loss_curve.json")) == uninterrupted.curve
    # The resumed run's reports follow the last step back; each is sent once (by rank 0 alone).
    cut = max((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]),
              default=next(i for i, step in enumerate(steps) if step > resumed_from))
    assert steps[cut:] == [p["step"] for p in uninterrupted.curve
                           if p["step"] > resumed_from and p.get("train_loss") is not None]
    weights = (uninterrupted.adapter_dir / "adapters.safetensors").read_bytes()
    assert read(settings, completed, "adapters.safetensors") == weights


def ranks_of(worker_pid: int) -> list[int]:
    """The pids of the training ranks this worker launched, and of their torch.distributed.run."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            if b"tunebus.services.trainer.backends.torch.rank" not in command:
                continue
            job = json.loads(Path(command[command.index(b"tunebus.services.trainer.backends.torch.rank")
                                          + 1].decode()).read_text())
        except (OSError, ValueError, IndexError):
            continue
        if job.get("worker_pid") == worker_pid:
            found.append(int(proc.name))
    return found


def train_uninterrupted(settings, event: DatasetValidatedEvent, tmp_path, backend: str,
                        processes: int = 1):
    from tunebus.services.trainer.backend import Distributed
    from tunebus.services.trainer.plan import train_spec
    from tunebus.services.trainer.runner import load_backend
    from tunebus.shared.models import resolve_model

    store = ObjectStore(settings.s3)
    request, dataset = event.data.request, event.data.dataset
    model_dir = resolve_model(request.base_model, store, tmp_path / "models")
    store.get_file(dataset.train_uri, tmp_path / "data" / "train.jsonl")
    store.get_file(dataset.valid_uri, tmp_path / "data" / "valid.jsonl")
    spec = train_spec(request, dataset, checkpoint_every=int(TRAINER_ENV["TUNEBUS_TRAINER__CHECKPOINT_EVERY"]))
    return load_backend(backend).train(model_dir, tmp_path / "data", tmp_path / "adapter", spec,
                                       distributed=Distributed(processes=processes))


def read(settings, completed: dict, name: str) -> bytes:
    artifact = next(a for a in completed["artifacts"] if a["name"] == name)
    response = ObjectStore(settings.s3).open(artifact["uri"])
    try:
        body = response.read()
    finally:
        response.close()
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
    return body


async def wait_until_idle(nc: nats.NATS, consumer: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await consumer_idle(nc, consumer):
        assert asyncio.get_running_loop().time() < deadline, f"{consumer} still busy"
        await asyncio.sleep(0.2)
