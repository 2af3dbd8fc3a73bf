"""trainer: hears validated datasets, trains an adapter, says how it went (MLX variant)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import structlog

from tunebus.contracts import (
    Artifact,
    DatasetValidatedEvent,
    TrainingCompleted,
    TrainingCompletedEvent,
    TrainingFailed,
    TrainingFailedEvent,
    TrainingMetrics,
    TrainingProgressEvent,
    TrainingStarted,
    TrainingStartedEvent,
    subjects,
)
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.delivery import Interrupted
from tunebus.shared.jobs import Claim
from tunebus.shared.models import ModelNotFound, resolve_model
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .backend import ProgressReport, TrainingStopped
from .plan import MLX_CAPABILITIES, progress_payload, refusal, train_spec

NAME = "trainer"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    backend = settings.trainer.backend
    worker = f"{socket.gethostname()}/{backend}"
    service.metadata.update(backend=backend, capabilities=json.dumps(
        {key: sorted(values) for key, values in MLX_CAPABILITIES.items()}))
    to_started = publishes(broker, TrainingStartedEvent, subjects.TRAINING_STARTED)
    to_progress = publishes(broker, TrainingProgressEvent, subjects.TRAINING_PROGRESS)
    to_completed = publishes(broker, TrainingCompletedEvent, subjects.TRAINING_COMPLETED)
    to_failed = publishes(broker, TrainingFailedEvent, subjects.TRAINING_FAILED)

    async def fail(cause: DatasetValidatedEvent, reason: str, error_type: str) -> None:
        failed = TrainingFailed(job_id=cause.data.job_id, reason=reason, error_type=error_type)
        await publish(to_failed, TrainingFailedEvent.wrap(
            failed, source=service.source, id=derived_event_id(cause, "failed")))
        log.warning("training failed", reason=reason)

    @consume(broker, subjects.DATASET_VALIDATED, durable=NAME, settings=settings)
    async def on_dataset_validated(event: DatasetValidatedEvent) -> None:
        """Train the adapter the request asks for, on the validated splits."""
        with service.working_on(event.data.job_id):
            await train(event)

    async def train(event: DatasetValidatedEvent) -> None:
        request, dataset = event.data.request, event.data.dataset
        job_id = request.job_id
        if await service.claims.claim("train", job_id, event.id) is Claim.DUPLICATE:
            log.info("training already claimed; ignored")
            return
        if reason := refusal(request, backend):
            await fail(event, reason, "unsupported")
            await service.claims.finish("train", job_id, event.id)
            return

        job_dir = settings.work_dir / "jobs" / job_id
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            model_dir = await asyncio.to_thread(
                resolve_model, request.base_model, service.store, settings.work_dir / "models",
                request.base_model_revision,
            )
        except ModelNotFound as e:
            await fail(event, str(e), "model_not_found")
            await service.claims.finish("train", job_id, event.id)
            return
        data_dir = job_dir / "data"
        await asyncio.to_thread(service.store.get_file, dataset.train_uri, data_dir / "train.jsonl")
        await asyncio.to_thread(service.store.get_file, dataset.valid_uri, data_dir / "valid.jsonl")

        spec = train_spec(request, dataset)
        iters_per_epoch = max(1.0, dataset.train_rows / spec.batch_size / spec.grad_accumulation_steps)
        started = TrainingStarted(
            job_id=job_id, adapter_name=request.adapter_name, backend=backend, worker=worker,
            total_steps=spec.iters, resolved_args={"spec": _jsonable(spec)},
        )
        await publish(to_started, TrainingStartedEvent.wrap(
            started, source=service.source, id=derived_event_id(event, "started")))

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        curve: list[dict] = []

        def on_progress(report: ProgressReport) -> None:
            # Called on the training thread: hand the publish to the event loop and go on.
            curve.append({"step": report.step, "train_loss": report.train_loss, "val_loss": report.val_loss})
            progress = progress_payload(job_id, report, time.monotonic() - t0, iters_per_epoch)
            out = TrainingProgressEvent.wrap(
                progress, source=service.source, id=derived_event_id(event, "progress", report.step))
            asyncio.run_coroutine_threadsafe(publish(to_progress, out), loop)

        from .mlx_backend import train_lora  # the ML stack loads only when there is work

        out_dir = job_dir / "adapter"
        try:
            result = await asyncio.to_thread(
                train_lora, model_dir, data_dir, out_dir, spec, on_progress=on_progress,
                should_stop=service.stopping.is_set)
        except TrainingStopped:
            # This worker is shutting down: give the job back for another worker to run.
            raise Interrupted(f"training of {job_id} stopped by shutdown") from None
        except Exception as e:  # a training error repeats on retry: report it, don't retry
            log.exception("training raised")
            await fail(event, f"{type(e).__name__}: {e}", "training_error")
            await service.claims.finish("train", job_id, event.id)
            return

        metrics = TrainingMetrics(
            first_loss=result.first_loss, final_loss=result.final_loss,
            final_val_loss=result.final_val_loss, steps=result.steps,
            trained_tokens=result.trained_tokens, seconds=result.seconds,
            tokens_per_second=result.trained_tokens / result.seconds if result.seconds else 0.0,
        )
        (out_dir / "training_args.json").write_text(json.dumps(result.resolved_args, indent=2))
        (out_dir / "metrics.json").write_text(metrics.model_dump_json(indent=2))
        (out_dir / "loss_curve.json").write_text(json.dumps(curve, indent=2))
        adapter_uri = f"s3://{settings.s3.adapters_bucket}/{request.adapter_name}/{job_id}"
        stored = await asyncio.to_thread(service.store.put_dir, adapter_uri, out_dir)
        completed = TrainingCompleted(
            job_id=job_id, request=request, dataset=dataset, backend=backend,
            adapter_uri=adapter_uri,
            artifacts=[Artifact(name=o.uri.removeprefix(adapter_uri + "/"), uri=o.uri,
                                sha256=o.sha256, size=o.size) for o in stored],
            metrics=metrics, resolved_args=result.resolved_args,
        )
        await publish(to_completed, TrainingCompletedEvent.wrap(
            completed, source=service.source, id=derived_event_id(event, "completed")))
        await service.claims.finish("train", job_id, event.id)
        shutil.rmtree(job_dir, ignore_errors=True)
        log.info("training completed", final_loss=result.final_loss, steps=result.steps)

    return service


def _jsonable(value):
    from dataclasses import asdict, is_dataclass

    data = asdict(value) if is_dataclass(value) else value
    return json.loads(json.dumps(data, default=str))


