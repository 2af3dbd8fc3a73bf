"""dataset-validator: hears training requests, says whether their dataset is fit to train on."""

from __future__ import annotations

import asyncio

import structlog

from tunebus.contracts import (
    DatasetRejectedEvent,
    DatasetValidatedEvent,
    TrainingRequestedEvent,
    subjects,
)
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.jobs import Claim
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .pipeline import check_dataset

NAME = "dataset-validator"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    to_validated = publishes(broker, DatasetValidatedEvent, subjects.DATASET_VALIDATED)
    to_rejected = publishes(broker, DatasetRejectedEvent, subjects.DATASET_REJECTED)

    @consume(broker, subjects.TRAINING_REQUESTED, durable=NAME, settings=settings)
    async def on_training_requested(event: TrainingRequestedEvent) -> None:
        """Validate and normalise the request's dataset; a job_id seen before is ignored."""
        job_id = event.data.job_id
        claim = await service.claims.claim("validate", job_id, event.id)
        if claim is Claim.DUPLICATE:
            log.info("duplicate training request ignored", job_id=job_id)
            return
        verdict = await asyncio.to_thread(check_dataset, service.store, event.data, settings.s3)
        if verdict.validated is not None:
            out = DatasetValidatedEvent.wrap(
                verdict.validated, source=service.source, id=derived_event_id(event, "validated")
            )
            await publish(to_validated, out)
            log.info("dataset validated", rows=verdict.validated.dataset.rows)
        else:
            out = DatasetRejectedEvent.wrap(
                verdict.rejected, source=service.source, id=derived_event_id(event, "rejected")
            )
            await publish(to_rejected, out)
            log.info("dataset rejected", reason=verdict.rejected.reason)
        await service.claims.finish("validate", job_id, event.id)

    return service
