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
from .provenance import artifacts_problem, training_problem
from tunebus.shared.adapter_layouts import layout_files
from .refs import BadRef, parse_ref
from .registry import BUCKET, Refused, Registry
from .verify import ArtifactMismatch, verify_artifacts

NAME = "adapter-registry"
log = structlog.get_logger()
API = [subjects.REGISTRY_LIST, subjects.REGISTRY_GET, subjects.REGISTRY_RESOLVE,
       subjects.REGISTRY_DOWNLOAD_URL, subjects.REGISTRY_PROMOTE, subjects.REGISTRY_ROLLBACK,
       subjects.REGISTRY_DELETE]


def build(settings: Settings) -> Service:
    service = create_service(NAME, settings)
    broker = service.broker
    policy = settings.registry
    service.metadata.update(capabilities=json.dumps({
        "api": API, "aliases": ["latest", "production"],
        "auto_promote": policy.auto_promote, "promote_metric": policy.promote_metric,
        "promote_min_improvement": policy.promote_min_improvement,
    }))
    to_registered = publishes(broker, AdapterRegisteredEvent, subjects.ADAPTER_REGISTERED)
    api = NatsRouter(middlewares=[ReplyToInvalidRequests])  # request/reply: an unreadable request gets an error
    registry: Registry | None = None

    @service.app.on_startup
    async def open_registry() -> None:
        nonlocal registry
        registry = await Registry.open((await broker.connect()).jetstream(), BUCKET, policy,
                                       replicas=settings.jetstream.replicas)

    @consume(broker, subjects.TRAINING_COMPLETED, durable=f"{NAME}-training", settings=settings)
    async def on_training_completed(event: TrainingCompletedEvent) -> None:
        """Remember the finished training until its evaluation arrives."""
        if problem := training_problem(event.data, settings.s3.adapters_bucket):
            raise PermanentError(f"not registered: {problem}")
        await registry.record_training(event.data, trained_at=event.time)

    async def register(event, evaluation) -> None:
        job_id = event.data.job_id
        verified_at = None
        training = await registry.training(job_id)
        if evaluation is not None and (problem := artifacts_problem(
                evaluation.report_artifacts, training.adapter_uri.rstrip("/"))):
            raise PermanentError(f"not registered: evaluation report: {problem}")
        if policy.verify_artifacts and await registry.version_of(job_id) is None:
            artifacts = list(training.artifacts)
            artifacts += evaluation.report_artifacts if evaluation is not None else []
            try:
                await asyncio.to_thread(verify_artifacts, service.store, artifacts)
            except ArtifactMismatch as e:
                raise PermanentError(f"not registered: {e}") from e
            verified_at = datetime.now(UTC)
        extra = []
        if policy.gguf and await registry.version_of(job_id) is None:
            copy = await asyncio.to_thread(gguf_copy, service.store, training,
                                           settings.s3.models_bucket, training.request.adapter_name)
            extra = [copy] if copy else []
        entry = await registry.register(job_id, evaluation, verified_at=verified_at, extra_artifacts=extra)
        out = AdapterRegisteredEvent.wrap(
            AdapterRegistered(job_id=entry.job_id, entry=entry),
            source=service.source, id=derived_event_id(event, "registered"))
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
        if entry.deleted:
            return DownloadUrls(ref=entry.ref, error=f"{entry.ref} is deleted")
        stored = {a.name: a for a in entry.artifacts}
        if query.format is None:  # every file, as named in the prefix
            files = {name: name for name in stored}
        elif query.format in entry.formats:  # one layout, flat
            files = layout_files(list(stored), entry.formats[query.format])
        else:
            return DownloadUrls(
                ref=entry.ref, formats=entry.formats,
                error=f"{entry.ref} is not stored in the {query.format} layout; it has: "
                      f"{', '.join(sorted(entry.formats)) or 'none'}")
        artifacts = {name: stored[key] for name, key in files.items()}
        limit = settings.s3.presign_expiry
        expires = min(timedelta(seconds=query.expires_s), limit) if query.expires_s else limit
        urls = {
            name: await asyncio.to_thread(service.store.presigned_get, a.uri, expires)
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
    return service
