"""dataset-validator: hears training requests, says whether their dataset is fit to train on;
answers synchronous checks of a dataset already in S3."""

from __future__ import annotations

import asyncio

import structlog

from tunebus.contracts import (
    DatasetRejectedEvent,
    DatasetValidatedEvent,
    TrainingRefused,
    TrainingRefusedEvent,
    TrainingRequestedEvent,
    subjects,
)
from tunebus.contracts.dataset import DatasetReport, ValidateDataset
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.jobs import Claim, Stage, content_digest
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .config import ValidatorSettings
from .pipeline import check_dataset, check_uri
from .summary import unreadable

NAME = "dataset-validator"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    subscribe(service, ValidatorSettings())
    return service


def subscribe(service: Service, config: ValidatorSettings) -> None:
    """Every subject the validator hears and says, handled with the service's broker, claims and
    store and the validation limits in `config`."""
    broker, settings = service.broker, service.settings
    to_validated = publishes(broker, DatasetValidatedEvent, subjects.DATASET_VALIDATED)
    to_rejected = publishes(broker, DatasetRejectedEvent, subjects.DATASET_REJECTED)
    to_refused = publishes(broker, TrainingRefusedEvent, subjects.TRAINING_REFUSED)

    @consume(broker, subjects.TRAINING_REQUESTED, durable=NAME, settings=settings)
    async def on_training_requested(event: TrainingRequestedEvent) -> None:
        """Validate and normalise the request's dataset; a job_id taken before is refused."""
        job_id = event.data.job_id
        digest = content_digest(event.data)
        claim = await service.claims.claim(Stage.VALIDATE, job_id, event.id, digest)
        if claim in (Claim.DUPLICATE, Claim.CONFLICT):
            await refuse(event, claim, digest)
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
        await service.claims.finish(Stage.VALIDATE, job_id, event.id, digest)

    async def refuse(event: TrainingRequestedEvent, claim: Claim, digest: str) -> None:
        """Say why a request whose job_id is taken runs nothing (unless it is the very event
        that holds the job_id, redelivered: its answer is out already)."""
        job_id = event.data.job_id
        held = await service.claims.holder(Stage.VALIDATE, job_id)
        if held["event_id"] == event.id:
            log.info("request redelivered after its answer; nothing to do")
            return
        if claim is Claim.CONFLICT:
            code, reason = "conflict", (
                f"job_id {job_id} is taken by a different request (event {held['event_id']}); "
                "nothing runs: submit a new request under a new job_id")
        else:
            code, reason = "duplicate", (
                f"job {job_id} was already requested with this same request (event "
                f"{held['event_id']}); nothing new runs, `tunebus status {job_id}` shows that job: "
                "to run it again (after a failure, say), submit it under a new job_id")
        refused = TrainingRefused(
            job_id=job_id, code=code, reason=reason, event_id=event.id, request_sha256=digest,
            original_event_id=held["event_id"], original_request_sha256=held.get("digest"))
        await publish(to_refused, TrainingRefusedEvent.wrap(
            refused, source=service.source, id=derived_event_id(event, "refused")))
        log.warning("training request refused", code=code, original_event_id=held["event_id"])

    @broker.subscriber(subjects.VALIDATOR_VALIDATE, queue=NAME)
    async def validate_dataset(query: ValidateDataset) -> DatasetReport:
        """Check a dataset in S3 as a training request would, writing nothing."""
        try:
            return await asyncio.to_thread(check_uri, service.store, query, settings, config)
        except Exception as e:  # the caller waits for an answer: give one, not a timeout
            log.exception("validation request failed", uri=query.uri)
            return unreadable(f"the validator could not read {query.uri}: {e}")
