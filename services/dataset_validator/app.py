"""dataset-validator: hears training requests, says whether their dataset is fit to train on;
answers synchronous checks of a dataset already in S3."""

from __future__ import annotations

import asyncio

import structlog

from tunebus.contracts import (
    DatasetRejectedEvent,
    DatasetValidatedEvent,
    TrainingRequestedEvent,
    subjects,
)
from tunebus.contracts.dataset import DatasetReport, ValidateDataset
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.jobs import Claim
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .config import ValidatorSettings
from .pipeline import check_dataset, check_uri
from .summary import unreadable

NAME = "dataset-validator"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    config = ValidatorSettings()
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
        with service.working_on(job_id):
            verdict = await asyncio.to_thread(check_dataset, service.store, event.data, settings,
                                              config)
        if verdict.validated is not None:
            out = DatasetValidatedEvent.wrap(
                verdict.validated, source=service.source, id=derived_event_id(event, "validated")
            )
            await publish(to_validated, out)
            log.info("dataset validated", rows=verdict.validated.dataset.rows,
                     format=verdict.validated.dataset.format)
        else:
            out = DatasetRejectedEvent.wrap(
                verdict.rejected, source=service.source, id=derived_event_id(event, "rejected")
            )
            await publish(to_rejected, out)
            log.info("dataset rejected", reason=verdict.rejected.reason)
        await service.claims.finish("validate", job_id, event.id)

    @broker.subscriber(subjects.VALIDATOR_VALIDATE, queue=NAME)
    async def validate_dataset(query: ValidateDataset) -> DatasetReport:
        """Check a dataset in S3 as a training request would, writing nothing."""
        try:
            return await asyncio.to_thread(check_uri, service.store, query, settings, config)
        except Exception as e:  # the caller waits for an answer: give one, not a timeout
            log.exception("validation request failed", uri=query.uri)
            return unreadable(f"the validator could not read {query.uri}: {e}")

    return service
