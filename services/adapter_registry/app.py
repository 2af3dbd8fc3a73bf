"""adapter-registry: the system of record for trained adapters, and its request/reply API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog

from tunebus.contracts import (
    AdapterList,
    AdapterRegistered,
    AdapterRegisteredEvent,
    AdapterReply,
    DownloadUrls,
    EvaluationCompletedEvent,
    EvaluationFailedEvent,
    GetAdapter,
    GetDownloadUrls,
    ListAdapters,
    TrainingCompletedEvent,
    subjects,
)
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .registry import BUCKET, Registry, parse_ref

NAME = "adapter-registry"
log = structlog.get_logger()


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    to_registered = publishes(broker, AdapterRegisteredEvent, subjects.ADAPTER_REGISTERED)
    registry: Registry | None = None

    @service.app.on_startup
    async def open_registry() -> None:
        nonlocal registry
        registry = Registry(await broker.key_value(BUCKET, history=5))

    @consume(broker, subjects.TRAINING_COMPLETED, durable=f"{NAME}-training", settings=settings)
    async def on_training_completed(event: TrainingCompletedEvent) -> None:
        """Remember the finished training until its evaluation arrives."""
        await registry.record_training(event.data)

    async def register(event, evaluation) -> None:
        entry = await registry.register(event.data.job_id, evaluation)
        out = AdapterRegisteredEvent.wrap(
            AdapterRegistered(job_id=entry.job_id, entry=entry),
            source=service.source, id=derived_event_id(event, "registered"))
        await publish(to_registered, out)
        log.info("adapter registered", ref=entry.ref)

    @consume(broker, subjects.EVALUATION_COMPLETED, durable=f"{NAME}-evaluation", settings=settings)
    async def on_evaluation_completed(event: EvaluationCompletedEvent) -> None:
        """Register a new version of the adapter, with its evaluation."""
        await register(event, event.data)

    @consume(broker, subjects.EVALUATION_FAILED, durable=f"{NAME}-evaluation-failed", settings=settings)
    async def on_evaluation_failed(event: EvaluationFailedEvent) -> None:
        """An adapter whose evaluation failed is still registered (without metrics): never lost."""
        await register(event, None)

    @broker.subscriber(subjects.REGISTRY_LIST, queue=NAME)
    async def list_adapters(query: ListAdapters) -> AdapterList:
        return AdapterList(adapters=await registry.list(
            name=query.name, base_model=query.base_model, include_deleted=query.include_deleted))

    @broker.subscriber(subjects.REGISTRY_GET, queue=NAME)
    async def get_adapter(query: GetAdapter) -> AdapterReply:
        try:
            return AdapterReply(entry=await registry.get(*parse_ref(query.ref)))
        except (KeyError, ValueError) as e:
            return AdapterReply(error=str(e.args[0]))

    @broker.subscriber(subjects.REGISTRY_DOWNLOAD_URL, queue=NAME)
    async def download_urls(query: GetDownloadUrls) -> DownloadUrls:
        try:
            entry = await registry.get(*parse_ref(query.ref))
        except (KeyError, ValueError) as e:
            return DownloadUrls(error=str(e.args[0]))
        limit = settings.s3.presign_expiry
        expires = min(timedelta(seconds=query.expires_s), limit) if query.expires_s else limit
        urls = {
            a.name: await asyncio.to_thread(service.store.presigned_get, a.uri, expires)
            for a in entry.artifacts
        }
        return DownloadUrls(
            ref=entry.ref, urls=urls, sha256={a.name: a.sha256 for a in entry.artifacts},
            expires_at=datetime.now(UTC) + expires)

    return service
