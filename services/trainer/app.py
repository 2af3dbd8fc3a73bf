"""trainer: hears validated datasets, trains an adapter, says how it went; hears cancel requests.

Routing: each backend has its own durable consumer (`trainer-mlx`, `trainer-cuda`), so every
validated dataset reaches one worker of each running backend, and each decides for itself:

- it can run the request (backend and capabilities, `plan.refusal`): it claims the job's training
  stage, keyed by backend, and trains. With backend=auto two capable backends race for the claim;
  the loser lets go. A redelivery after a crash goes to the same backend, whose claim resumes.
- it cannot: it asks service discovery which trainers are running. If one of them can, it lets the
  message go (that worker's own consumer has it). If none can, it claims the stage as
  "unserved" and says TrainingFailed with every running worker's reason, once, however many
  workers reached the same conclusion.
"""

from __future__ import annotations

import socket
import time

import structlog
from tunebus.contracts import (
    DatasetValidatedEvent,
    TrainingCancelled,
    TrainingCancelledEvent,
    TrainingCompletedEvent,
    TrainingFailed,
    TrainingFailedEvent,
    TrainingProgress,
    TrainingProgressEvent,
    TrainingStarted,
    TrainingStartedEvent,
    subjects,
)
from tunebus.contracts.training import CancelReply, CancelTraining, TrainerCapabilities
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.delivery import Interrupted
from tunebus.shared.jobs import Claim, Stage
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .cancellation import CancelWatch, cancel_reason, request_cancel
from . import backends, trackers
from .plan import refusal, unserved_reason
from .routing import running_trainers
from .runner import JobFailed, JobStopped, TrainingRun, backend_thread

NAME = "trainer"
STAGE = Stage.TRAIN
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    backend = settings.trainer.backend
    capabilities = trackers.offered(
        backends.capabilities(backend, memory_gb=settings.trainer.memory_gb),
        settings.trainer.trackers)
    service.metadata.update(backend=backend, capabilities=capabilities.model_dump_json())
    subscribe(service, capabilities, worker=f"{socket.gethostname()}/{backend}")
    return service


def subscribe(service: Service, capabilities: TrainerCapabilities, *, worker: str) -> None:
    """Every subject the trainer hears and says, handled with the service's broker, claims and
    store, for a worker of the settings' backend that can run what `capabilities` says."""
    broker, settings = service.broker, service.settings
    backend = settings.trainer.backend
    to_started = publishes(broker, TrainingStartedEvent, subjects.TRAINING_STARTED)
    to_progress = publishes(broker, TrainingProgressEvent, subjects.TRAINING_PROGRESS)
    to_completed = publishes(broker, TrainingCompletedEvent, subjects.TRAINING_COMPLETED)
    to_failed = publishes(broker, TrainingFailedEvent, subjects.TRAINING_FAILED)
    to_cancelled = publishes(broker, TrainingCancelledEvent, subjects.TRAINING_CANCELLED)

    @service.app.on_startup
    async def warm_up() -> None:
        """Import the ML stack and load a throwaway model before answering discovery or taking
        a job, so that the first job costs what the second does."""
        started = time.perf_counter()
        try:
            await backend_thread().run(backends.warm_up, backend)
        except Exception as e:  # the first job will fail with it; say so now
            log.error("the training backend does not warm up", backend=backend, error=repr(e))
            return
        log.info("training backend warm", backend=backend, seconds=time.perf_counter() - started)

    @consume(broker, subjects.DATASET_VALIDATED, durable=f"{NAME}-{backend}", settings=settings)
    async def on_dataset_validated(event: DatasetValidatedEvent) -> None:
        """Train the adapter the request asks for, if this worker's backend can (see above)."""
        request = event.data.request
        if reason := refusal(request, capabilities):
            await leave_or_reject(event, reason)
            return
        owner = f"{event.id}/{backend}"
        if await service.claims.claim(STAGE, request.job_id, owner) is Claim.DUPLICATE:
            log.info("training already claimed; ignored")
            return
        with service.working_on(request.job_id):
            await train(event, owner)

    @broker.subscriber(subjects.TRAINER_CANCEL, queue=NAME)
    async def on_cancel(command: CancelTraining) -> CancelReply:
        """Cancel a job's training; one trainer answers, the one running the job stops."""
        reply = await request_cancel(service.claims.kv, command)
        log.info("cancel requested", job_id=command.job_id, status=reply.status)
        return reply

    async def train(event: DatasetValidatedEvent, owner: str) -> None:
        job_id = event.data.job_id
        if reason := await cancel_reason(service.claims.kv, job_id):
            await say_cancelled(event, TrainingCancelled(job_id=job_id, reason=reason), owner)
            return

        async def started(payload: TrainingStarted) -> None:
            # A resumed run is a new fact: its id differs from the first start's.
            await publish(to_started, TrainingStartedEvent.wrap(payload, source=service.source, id=(
                derived_event_id(event, "started", payload.resumed_from_step or 0))))

        async def progress(payload: TrainingProgress) -> None:
            await publish(to_progress, TrainingProgressEvent.wrap(
                payload, source=service.source, id=derived_event_id(event, "progress", payload.step)))

        async with CancelWatch(service.claims.kv, job_id) as cancel:

            def should_stop() -> str | None:
                if cancel.cancelled:
                    return "cancel"
                return "shutdown" if service.stopping.is_set() else None

            run = TrainingRun(service, backend, worker, event, started, progress, should_stop,
                              capabilities=capabilities)
            try:
                completed = await run.run()
            except JobStopped as e:
                if e.reason == "shutdown":  # hand the job back; the next worker resumes it
                    raise Interrupted(f"training of {job_id} stopped by shutdown") from None
                checkpoint = e.checkpoint
                await say_cancelled(event, TrainingCancelled(
                    job_id=job_id, reason=cancel.reason or "cancelled by request", step=e.step,
                    checkpoint_uri=checkpoint.uri if checkpoint else None,
                    checkpoint_step=checkpoint.step if checkpoint else None), owner)
                return
            except JobFailed as e:
                await say_failed(event, e.reason, e.error_type, owner)
                return
        await publish(to_completed, TrainingCompletedEvent.wrap(
            completed, source=service.source, id=derived_event_id(event, "completed")))
        await service.claims.finish(STAGE, job_id, owner)
        log.info("training completed", final_loss=completed.metrics.final_loss,
                 steps=completed.metrics.steps, resumed_from=completed.metrics.resumed_from_step)

    async def leave_or_reject(event: DatasetValidatedEvent, own_reason: str) -> None:
        """This worker cannot run the request: leave it to a running worker that can, or say
        that none can."""
        request = event.data.request
        running = await running_trainers(
            await broker.connect(), NAME, settings.trainer.discovery_timeout_s)
        reason = unserved_reason(request, running)
        if reason is None:
            log.info("left to another trainer", reason=own_reason)
            return
        owner = f"{event.id}/unserved"
        if await service.claims.claim(STAGE, request.job_id, owner) is Claim.DUPLICATE:
            return  # a worker took it meanwhile, or another already said no
        await say_failed(event, reason, "unsupported", owner)

    async def say_failed(event: DatasetValidatedEvent, reason: str, error_type: str, owner: str) -> None:
        failed = TrainingFailed(job_id=event.data.job_id, reason=reason, error_type=error_type)
        await publish(to_failed, TrainingFailedEvent.wrap(
            failed, source=service.source, id=derived_event_id(event, "failed")))
        await service.claims.finish(STAGE, event.data.job_id, owner)
        log.warning("training failed", reason=reason)

    async def say_cancelled(event: DatasetValidatedEvent, cancelled: TrainingCancelled, owner: str) -> None:
        await publish(to_cancelled, TrainingCancelledEvent.wrap(
            cancelled, source=service.source, id=derived_event_id(event, "cancelled")))
        await service.claims.finish(STAGE, event.data.job_id, owner)
        log.info("training cancelled", step=cancelled.step, checkpoint=cancelled.checkpoint_uri)
