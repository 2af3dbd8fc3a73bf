"""The trainer on the running stack: progress in order and the run's files beside the adapter,
routing (a request no running worker can serve fails with its reason; one another worker can
serve is left to it), and cancellation with `tunebus cancel`."""

from __future__ import annotations

import asyncio
import json
import math
import uuid

import nats
import pytest
from nats.micro import add_service
from tunebus.contracts.training import TrainerCapabilities
from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env
from typer.testing import CliRunner

from tests.helpers.events import consumer_idle, wait_until
from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows

pytestmark = pytest.mark.anyio


def request_body(job_id: str, dataset_uri: str, model_uri: str, **hyperparameters) -> bytes:
    body = json.loads(training_request(job_id, dataset_uri, model_uri))
    body["data"]["hyperparameters"] |= hyperparameters
    body["data"]["evaluation"] = {"enabled": False}  # the trainer is under test, not the evaluator
    return json.dumps(body).encode()


@pytest.fixture
def dataset_uri(stack, store):
    job = uuid.uuid4().hex[:8]
    return upload_rows(store, stack.settings.s3.datasets_bucket, f"uploads/trainer-{job}/adder.jsonl", SAMPLE_ROWS)


@pytest.fixture
def cli(stack, monkeypatch):
    for key, value in service_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()

    async def invoke(*args):  # the CLI runs its own event loop: give it a thread
        return await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)

    return invoke


async def test_progress_arrives_in_order_and_the_run_is_explained_beside_the_adapter(
        bus, store, dataset_uri, tiny_model_uri):
    nc, events = bus
    job_id = f"progress-{uuid.uuid4().hex[:8]}"
    await publish_request(nc, request_body(job_id, dataset_uri, tiny_model_uri, iters=30, checkpoint_every=20))
    completed = (await events.wait_for(job_id, ".training.completed", timeout=180))["data"]

    said = [s.rsplit(".", 1)[-1] for s, body in events.messages
            if body.get("subject") == job_id and body.get("source") == "tunebus/trainer"]
    assert said[0] == "started" and said[-1] == "completed" and set(said[1:-1]) == {"progress"}
    started = events.of_job(job_id, ".training.started")[0]["data"]
    assert started["resumed_from_step"] is None and started["total_steps"] == 30
    args = started["resolved_args"]
    assert args["optimizer_config"] == {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": True,
                                        "class": "mlx.optimizers.AdamW"}
    assert (args["lr_schedule"]["name"], args["max_grad_norm"]) == ("cosine", 1.0)
    assert args["train_mode"] == "sft" and args["mask_prompt"] is True and args["checkpoint_every"] == 20

    progress = [p["data"] for p in events.of_job(job_id, ".training.progress")]
    steps = [p["step"] for p in progress]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and {3, 30} <= set(steps)
    assert all(p["total_steps"] == 30 and p["train_loss"] is not None for p in progress)
    tokens = [p["trained_tokens"] for p in progress]
    assert tokens == sorted(tokens) and tokens[-1] == completed["metrics"]["trained_tokens"]
    last = progress[-1]
    assert last["eta_seconds"] == 0 and last["epoch"] > 0 and last["tokens_per_second"] > 0
    # The default cosine schedule, at the last of 30 updates.
    last_rate = 0.005 * (1 + math.cos(math.pi * 29 / 30)) / 2
    assert last["learning_rate"] == pytest.approx(last_rate, rel=1e-5) and last["peak_memory_gb"] is not None

    files = {a["name"]: a for a in completed["artifacts"]}
    assert set(files) == {"adapters.safetensors", "adapter_config.json", "training_args.json",
                          "metrics.json", "loss_curve.json", "loss_curve.png",
                          "peft/adapter_config.json", "peft/adapter_model.safetensors"}
    assert completed["loss_curve"] == "loss_curve.json" and completed["mask_prompt"] is True
    curve = json.loads(read(store, files["loss_curve.json"]["uri"]))
    assert [p["step"] for p in curve if "train_loss" in p] == [3 * i for i in range(1, 11)]
    assert read(store, files["loss_curve.png"]["uri"]).startswith(b"\x89PNG")
    latest = json.loads(read(store, f"{completed['adapter_uri']}/checkpoints/latest.json"))
    assert latest["latest"]["step"] == 20
    assert "first_step_at" in completed["metrics"]["timings"]


async def test_a_request_no_running_trainer_can_serve_fails_with_its_reason(bus, dataset_uri, tiny_model_uri):
    nc, events = bus
    job_id = f"unserved-{uuid.uuid4().hex[:8]}"
    body = json.loads(request_body(job_id, dataset_uri, tiny_model_uri, iters=5))
    body["data"]["backend"] = "cuda"
    await publish_request(nc, json.dumps(body).encode())
    failed = (await events.wait_for(job_id, ".training.failed", timeout=60))["data"]
    assert failed["reason"] == ("no running trainer can serve this request: no cuda worker is running; "
                                "backend 'cuda' was requested; the mlx worker runs 'mlx'")
    assert failed["error_type"] == "unsupported"
    assert not events.of_job(job_id, ".training.started")


async def test_a_request_another_running_trainer_can_serve_is_left_to_it(bus, dataset_uri, tiny_model_uri):
    nc, events = bus
    cuda = TrainerCapabilities(backend="cuda", methods=["sft"], adapters=["lora"], quantization=["none"],
                               optimizers=["adamw"])
    # A CUDA worker, as far as service discovery can tell: it announces itself, and trains nothing.
    other = await add_service(nc, name="trainer", version="0.1.0", metadata={
        "backend": "cuda", "capabilities": cuda.model_dump_json()})
    try:
        job_id = f"for-cuda-{uuid.uuid4().hex[:8]}"
        body = json.loads(request_body(job_id, dataset_uri, tiny_model_uri, iters=5))
        body["data"]["backend"] = "cuda"
        await publish_request(nc, json.dumps(body).encode())
        await events.wait_for(job_id, ".dataset.validated")
        await wait_until_idle(nc, "trainer-mlx")
    finally:
        await other.stop()
    assert not events.of_job(job_id, ".training.failed")
    assert not events.of_job(job_id, ".training.started")


async def test_cancel_stops_a_running_job_keeps_its_checkpoint_and_a_queued_job_never_starts(
        bus, cli, store, dataset_uri, tiny_model_uri):
    nc, events = bus
    running, queued = f"cancel-run-{uuid.uuid4().hex[:8]}", f"cancel-queued-{uuid.uuid4().hex[:8]}"
    await publish_request(nc, request_body(running, dataset_uri, tiny_model_uri, iters=5000, checkpoint_every=10))
    await wait_until(lambda: any(p["data"]["step"] > 10 for p in events.of_job(running, ".training.progress")),
                     120, "progress past step 10")
    await publish_request(nc, request_body(queued, dataset_uri, tiny_model_uri, iters=5))
    await events.wait_for(queued, ".dataset.validated")

    result = await cli("cancel", queued, "--reason", "not needed after all")
    assert result.exit_code == 0 and "has not started training" in result.output
    result = await cli("cancel", running)
    assert result.exit_code == 0 and "stops at its next step" in result.output

    cancelled = (await events.wait_for(running, ".training.cancelled", timeout=60))["data"]
    assert cancelled["reason"] == "cancelled by request"
    assert cancelled["step"] >= cancelled["checkpoint_step"] >= 10 and cancelled["step"] < 5000
    assert store.exists(f"{cancelled['checkpoint_uri']}/state.json")
    queued_cancelled = (await events.wait_for(queued, ".training.cancelled", timeout=60))["data"]
    assert queued_cancelled["reason"] == "not needed after all" and queued_cancelled["step"] is None
    assert not events.of_job(queued, ".training.started")

    await wait_until_idle(nc, "trainer-mlx")
    assert not events.of_job(running, ".training.completed") and not events.of_job(queued, ".training.completed")


async def test_cancelling_a_finished_or_unknown_job_says_so(bus, cli, dataset_uri, tiny_model_uri):
    nc, events = bus
    job_id = f"done-{uuid.uuid4().hex[:8]}"
    await publish_request(nc, request_body(job_id, dataset_uri, tiny_model_uri, iters=2))
    await events.wait_for(job_id, ".training.completed", timeout=120)
    await wait_until_idle(nc, "trainer-mlx")

    result = await cli("cancel", job_id)
    assert result.exit_code == 1
    assert f"finished: the training of job {job_id} has already ended; nothing to cancel" in result.output
    result = await cli("cancel", "no-such-job-42")
    assert result.exit_code == 1
    assert "unknown: no job no-such-job-42 has reached the dataset validator or a trainer" in result.output


def read(store, uri: str) -> bytes:
    response = store.open(uri)
    try:
        return response.read()
    finally:
        response.close()


async def wait_until_idle(nc: nats.NATS, durable: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await consumer_idle(nc, durable):
        assert asyncio.get_running_loop().time() < deadline, f"{durable} still busy"
        await asyncio.sleep(0.2)
