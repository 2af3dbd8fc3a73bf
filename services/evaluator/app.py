"""evaluator: hears finished trainings, measures base model and base+adapter on held-out data."""

from __future__ import annotations

import json
import shutil
import time

import structlog

from tunebus.contracts import (
    EvaluationCompleted,
    EvaluationCompletedEvent,
    EvaluationFailed,
    EvaluationFailedEvent,
    TrainingCompletedEvent,
    subjects,
)
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.jobs import Claim, Stage
from tunebus.shared.models import ModelNotFound
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .backend import BackendUnavailable, available, load_backend
from .compare import INFORMATIONAL, QUALITY
from .examples import BadExample
from .inference_api import inference_router
from .pipeline import CannotEvaluate, evaluate, on_backend_thread

NAME = "evaluator"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    backends = available()
    service.metadata.update(
        backend=settings.evaluator.backend if settings.evaluator.backend != "auto"
        else (backends[0] if backends else "none"),
        capabilities=json.dumps({"backends": backends, "metrics": sorted(QUALITY | INFORMATIONAL),
                                 "probes": ["exact_match", "contains", "rouge_l", "latency"]}),
    )

    @service.app.on_startup
    async def warm_up() -> None:
        """Import the backend and measure a throwaway model before answering discovery or
        taking a job, so that the first evaluation costs what the second does."""
        started = time.perf_counter()
        try:
            await on_backend_thread(lambda: load_backend(settings.evaluator.backend).warm_up())
        except Exception as e:  # the first evaluation will fail with it; say so now
            log.error("the evaluation backend does not warm up", error=repr(e))
            return
        log.info("evaluation backend warm", seconds=time.perf_counter() - started)

    subscribe(service)
    return service


def subscribe(service: Service) -> None:
    """Every subject the evaluator hears and says, handled with the service's broker, claims and
    store."""
    broker, settings = service.broker, service.settings
    to_completed = publishes(broker, EvaluationCompletedEvent, subjects.EVALUATION_COMPLETED)
    to_failed = publishes(broker, EvaluationFailedEvent, subjects.EVALUATION_FAILED)

    @consume(broker, subjects.TRAINING_COMPLETED, durable=NAME, settings=settings)
    async def on_training_completed(event: TrainingCompletedEvent) -> None:
        """Loss, perplexity, token accuracy and probe answers of the base model and of
        base+adapter on the held-out split; the report goes next to the adapter."""
        with service.working_on(event.data.job_id):
            await evaluate_job(event)

    async def evaluate_job(event: TrainingCompletedEvent) -> None:
        done = event.data
        request = done.request
        job_id = done.job_id
        if await service.claims.claim(Stage.EVALUATE, job_id, event.id) is Claim.DUPLICATE:
            log.info("evaluation already claimed; ignored")
            return
        if not request.evaluation.enabled:
            result = EvaluationCompleted(job_id=job_id, adapter_name=request.adapter_name, skipped=True)
        else:
            job_dir = settings.work_dir / "eval" / job_id
            try:
                result = await evaluate(done, service.store, settings, job_dir)
            except (ModelNotFound, BackendUnavailable, BadExample, CannotEvaluate) as e:
                # These fail the same way on every retry: say so, and the registry still
                # registers the adapter (without metrics).
                failed = EvaluationFailed(job_id=job_id, adapter_name=request.adapter_name, reason=str(e))
                await publish(to_failed, EvaluationFailedEvent.wrap(
                    failed, source=service.source, id=derived_event_id(event, "failed")))
                await service.claims.finish(Stage.EVALUATE, job_id, event.id)
                log.warning("evaluation failed", reason=str(e))
                return
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
        await publish(to_completed, EvaluationCompletedEvent.wrap(
            result, source=service.source, id=derived_event_id(event, "completed")))
        await service.claims.finish(Stage.EVALUATE, job_id, event.id)
        log.info("evaluation completed", improved=result.improved, regressions=result.regressions,
                 relative_change=result.relative_change)

    # Generation with adapters: tunebus.v1.inference.generate / adapters / load / unload.
    broker.include_router(inference_router(service, queue=NAME))
