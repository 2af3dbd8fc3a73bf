"""evaluator: hears finished trainings, measures base model and base+adapter on held-out data."""

from __future__ import annotations

import asyncio
import shutil
from itertools import islice
from pathlib import Path

import structlog

from tunebus.contracts import (
    EvaluationCompleted,
    EvaluationCompletedEvent,
    EvaluationFailed,
    EvaluationFailedEvent,
    LossMetrics,
    TrainingCompletedEvent,
    subjects,
)
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.jobs import Claim
from tunebus.shared.models import ModelNotFound, resolve_model
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .compare import compare

NAME = "evaluator"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    to_completed = publishes(broker, EvaluationCompletedEvent, subjects.EVALUATION_COMPLETED)
    to_failed = publishes(broker, EvaluationFailedEvent, subjects.EVALUATION_FAILED)

    @consume(broker, subjects.TRAINING_COMPLETED, durable=NAME, settings=settings)
    async def on_training_completed(event: TrainingCompletedEvent) -> None:
        """Loss and perplexity of the base model and of base+adapter on the held-out split."""
        done = event.data
        request = done.request
        job_id = done.job_id
        if await service.claims.claim("evaluate", job_id, event.id) is Claim.DUPLICATE:
            log.info("evaluation already claimed; ignored")
            return
        if not request.evaluation.enabled:
            result = EvaluationCompleted(job_id=job_id, adapter_name=request.adapter_name, skipped=True)
        else:
            job_dir = settings.work_dir / "eval" / job_id
            try:
                result = await _evaluate(service, event, job_dir)
            except ModelNotFound as e:
                failed = EvaluationFailed(job_id=job_id, adapter_name=request.adapter_name, reason=str(e))
                await publish(to_failed, EvaluationFailedEvent.wrap(
                    failed, source=service.source, id=derived_event_id(event, "failed")))
                await service.claims.finish("evaluate", job_id, event.id)
                return
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
        await publish(to_completed, EvaluationCompletedEvent.wrap(
            result, source=service.source, id=derived_event_id(event, "completed")))
        await service.claims.finish("evaluate", job_id, event.id)
        log.info("evaluation completed", improved=result.improved, relative_change=result.relative_change)

    return service


async def _evaluate(service: Service, event: TrainingCompletedEvent, job_dir: Path) -> EvaluationCompleted:
    from .mlx_eval import evaluate_loss  # the ML stack loads only when there is work

    done = event.data
    request = done.request
    store = service.store
    model_dir = await asyncio.to_thread(
        resolve_model, request.base_model, store, service.settings.work_dir / "models",
        request.base_model_revision)
    adapter_dir = job_dir / "adapter"
    for artifact in done.artifacts:
        await asyncio.to_thread(store.get_file, artifact.uri, adapter_dir / artifact.name)
    data = job_dir / "valid.jsonl"
    await asyncio.to_thread(store.get_file, done.dataset.valid_uri, data)
    if request.evaluation.max_examples:
        _keep_first_lines(data, request.evaluation.max_examples)

    hp = request.hyperparameters
    options = {"max_seq_length": hp.max_seq_length, "batch_size": 1}
    before = await asyncio.to_thread(evaluate_loss, model_dir, data, **options)
    after = await asyncio.to_thread(evaluate_loss, model_dir, data, adapter_dir=adapter_dir, **options)
    report_uri = f"{done.adapter_uri}/evaluation.json"
    result = compare(
        done.job_id, request.adapter_name,
        LossMetrics(loss=before.loss, perplexity=before.perplexity),
        LossMetrics(loss=after.loss, perplexity=after.perplexity),
        examples=after.examples, tokens=after.tokens, report_uri=report_uri,
    )
    await asyncio.to_thread(
        store.put_bytes, report_uri, result.model_dump_json(indent=2).encode(), "application/json")
    return result


def _keep_first_lines(path: Path, n: int) -> None:
    with path.open() as f:
        lines = list(islice(f, n))
    path.write_text("".join(lines))
