"""adapter-registry: the system of record for trained adapters, and its request/reply API."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import structlog
from faststream.nats import NatsRouter

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
from tunebus.contracts.registry import AliasReply, DeleteAdapter, PromoteAdapter, ResolveAdapter, RollbackAdapter
from tunebus.shared.bus import consume, derived_event_id, publish, publishes
from tunebus.shared.delivery import PermanentError
from tunebus.shared.service import Service, create_service
from tunebus.shared.settings import Settings

from .gguf_copy import gguf_copy
from .invalid_requests import ReplyToInvalidRequests
from .refs import BadRef, parse_ref
from .registry import BUCKET, Refused, Registry, download_files
from .verify import verify_artifacts

NAME = "adapter-registry"
log = structlog.get_logger()
API = [subjects.REGISTRY_LIST, subjects.REGISTRY_GET, subjects.REGISTRY_RESOLVE,
       subjects.REGISTRY_DOWNLOAD_URL, subjects.REGISTRY_PROMOTE, subjects.REGISTRY_ROLLBACK,
       subjects.REGISTRY_DELETE]


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    policy = settings.registry
    service.metadata.update(capabilities=json.dumps({
        "api": API, "aliases": ["latest", "production"],
        "auto_promote": policy.auto_promote, "promote_metric": policy.promote_metric,
        "promote_min_improvement": policy.promote_min_improvement,
    }))
    subscribe(service, Registry(service.bucket(BUCKET), policy))
    return service


def subscribe(service: Service, registry: Registry) -> None:
    """Every subject the registry hears and answers, handled with the service's broker and store
    and `registry`: what to do is the Registry's; a handler turns a message into a call and its
    outcome into an answer."""
    broker, store, settings, source = service.broker, service.store, service.settings, service.source
    to_registered = publishes(broker, AdapterRegisteredEvent, subjects.ADAPTER_REGISTERED)
    api = NatsRouter(middlewares=[ReplyToInvalidRequests])  # request/reply: an unreadable request gets an error

    async def verify(artifacts) -> None:
        await asyncio.to_thread(verify_artifacts, store, artifacts)

    async def copies(training) -> list:
        copy = await asyncio.to_thread(gguf_copy, store, training, settings.s3.models_bucket,
                                       training.request.adapter_name)
        return [copy] if copy else []

    @consume(broker, subjects.TRAINING_COMPLETED, durable=f"{NAME}-training", settings=settings)
    async def on_training_completed(event: TrainingCompletedEvent) -> None:
        """Remember the finished training until its evaluation arrives."""
        try:
            await registry.accept_training(event.data, adapters_bucket=settings.s3.adapters_bucket,
                                           trained_at=event.time)
        except Refused as e:
            raise PermanentError(str(e)) from e

    async def register(event, evaluation) -> None:
        try:
            entry = await registry.accept_evaluation(event.data.job_id, evaluation, verify=verify,
                                                     copies=copies if settings.registry.gguf else None)
        except Refused as e:
            raise PermanentError(str(e)) from e
        out = AdapterRegisteredEvent.wrap(
            AdapterRegistered(job_id=entry.job_id, entry=entry),
            source=source, id=derived_event_id(event, "registered"))
        await publish(to_registered, out)
        log.info("adapter registered", ref=entry.ref, aliases=entry.aliases,
                 promotion=entry.promotion.reason if entry.promotion else None)

    @consume(broker, subjects.EVALUATION_COMPLETED, durable=f"{NAME}-evaluation", settings=settings)
    async def on_evaluation_completed(event: EvaluationCompletedEvent) -> None:
        """Register a new version of the adapter, with its evaluation."""
        await register(event, event.data)

    @consume(broker, subjects.EVALUATION_FAILED, durable=f"{NAME}-evaluation-failed", settings=settings)
    async def on_evaluation_failed(event: EvaluationFailedEvent) -> None:
        """An adapter whose evaluation failed is still registered (without metrics): never lost."""
        await register(event, None)

    @api.subscriber(subjects.REGISTRY_LIST, queue=NAME)
    async def list_adapters(query: ListAdapters) -> AdapterList:
        try:
            entries, cursor = await registry.page(
                name=query.name, base_model=query.base_model, tag=query.tag,
                include_deleted=query.include_deleted, after=query.cursor, limit=query.limit)
        except ValueError as e:
            return AdapterList(error=str(e))
        return AdapterList(adapters=entries, next_cursor=cursor)

    async def lookup(ref: str) -> AdapterReply:
        try:
            return AdapterReply(entry=await registry.resolve(parse_ref(ref)))
        except (KeyError, BadRef) as e:
            return AdapterReply(error=str(e.args[0]))

    @api.subscriber(subjects.REGISTRY_GET, queue=NAME)
    async def get_adapter(query: GetAdapter) -> AdapterReply:
        return await lookup(query.ref)

    @api.subscriber(subjects.REGISTRY_RESOLVE, queue=NAME)
    async def resolve_adapter(query: ResolveAdapter) -> AdapterReply:
        return await lookup(query.ref)

    @api.subscriber(subjects.REGISTRY_DOWNLOAD_URL, queue=NAME)
    async def download_urls(query: GetDownloadUrls) -> DownloadUrls:
        try:
            entry = await registry.resolve(parse_ref(query.ref))
        except (KeyError, BadRef) as e:
            return DownloadUrls(error=str(e.args[0]))
        try:
            artifacts = download_files(entry, query.format)
        except Refused as e:
            return DownloadUrls(ref=entry.ref, error=str(e),
                                formats={} if entry.deleted else entry.formats)
        limit = settings.s3.presign_expiry
        expires = min(timedelta(seconds=query.expires_s), limit) if query.expires_s else limit
        urls = {
            name: await asyncio.to_thread(store.presigned_get, a.uri, expires)
            for name, a in artifacts.items()
        }
        return DownloadUrls(
            ref=entry.ref, urls=urls, sha256={name: a.sha256 for name, a in artifacts.items()},
            expires_at=datetime.now(UTC) + expires, uris={name: a.uri for name, a in artifacts.items()},
            sizes={name: a.size for name, a in artifacts.items()},
            format=query.format or entry.format, formats=entry.formats)

    @api.subscriber(subjects.REGISTRY_PROMOTE, queue=NAME)
    async def promote(query: PromoteAdapter) -> AliasReply:
        try:
            entry, previous = await registry.promote(parse_ref(query.ref), query.reason)
        except (KeyError, BadRef, Refused) as e:
            return AliasReply(alias=query.alias, error=str(e.args[0]))
        log.info("promoted", ref=entry.ref, previous=previous, reason=query.reason)
        return AliasReply(name=entry.name, alias=query.alias, version=entry.version,
                          previous=previous, entry=entry)

    @api.subscriber(subjects.REGISTRY_ROLLBACK, queue=NAME)
    async def rollback(query: RollbackAdapter) -> AliasReply:
        try:
            entry, previous = await registry.rollback(query.name, query.reason)
        except (KeyError, Refused) as e:
            return AliasReply(name=query.name, alias=query.alias, error=str(e.args[0]))
        log.info("rolled back", ref=entry.ref, previous=previous, reason=query.reason)
        return AliasReply(name=entry.name, alias=query.alias, version=entry.version,
                          previous=previous, entry=entry)

    @api.subscriber(subjects.REGISTRY_DELETE, queue=NAME)
    async def delete(query: DeleteAdapter) -> AdapterReply:
        try:
            ref = parse_ref(query.ref)
            if ref.version is None:
                raise BadRef(f"delete needs name:version, not {query.ref!r}: a version is deleted, "
                             "never a whole name")
            entry = await registry.delete(ref.name, ref.version, query.reason)
        except (KeyError, BadRef, Refused) as e:
            return AdapterReply(error=str(e.args[0]))
        log.info("deleted", ref=entry.ref, reason=query.reason)
        return AdapterReply(entry=entry)

    broker.include_router(api)
