"""The frame every tunebus service shares: settings, broker, object store, job claims."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from dataclasses import dataclass, field
from importlib.metadata import version
from urllib.parse import urlsplit, urlunsplit

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from nats.micro import add_service

from tunebus.contracts import subjects

from . import jobs
from .bus import bound_deliveries, create_broker, ensure_streams, job_events_recorder, key_value
from .health import ConsumerWatch
from .logging import configure_logging
from .objectstore import ObjectStore
from .settings import Settings

VERSION = version("tunebus")


@dataclass
class Service:
    name: str
    settings: Settings
    broker: NatsBroker
    app: FastStream
    store: ObjectStore
    claims: jobs.JobClaims = field(init=False)
    # Set when shutdown begins, so long work (a training loop) can stop at its next step.
    stopping: threading.Event = field(default_factory=threading.Event)
    # What this instance announces over NATS service discovery ($SRV.PING/INFO/STATS):
    # static facts (backend, capabilities) in `metadata`, live ones in `active_jobs`.
    metadata: dict[str, str] = field(default_factory=dict)
    active_jobs: set[str] = field(default_factory=set)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # What is wrong with this instance's consumers (stalled), as the health watch last saw it.
    problems: list[str] = field(default_factory=list)

    @contextmanager
    def working_on(self, job_id: str) -> Iterator[None]:
        self.active_jobs.add(job_id)
        try:
            yield
        finally:
            self.active_jobs.discard(job_id)

    def status(self) -> dict:
        return {
            "service": self.name,
            "version": VERSION,
            "metadata": self.metadata,
            "active_jobs": sorted(self.active_jobs),
            "started_at": self.started_at.isoformat(),
            "healthy": not self.problems,
            "problems": self.problems,
        }

    @property
    def source(self) -> str:
        """The CloudEvents `source` of everything this service publishes."""
        return f"tunebus/{self.name}"


def create_service(name: str, settings: Settings) -> Service:
    broker, policy = create_broker(settings, name)
    app = FastStream(broker, logger=structlog.get_logger("faststream"))
    service = Service(name, settings, broker, app, ObjectStore(settings.s3))
    service.metadata["restarts"] = str(settings.restarts)
    discovery: dict = {}

    @app.on_startup
    async def connect() -> None:
        # Connect before the subscribers start, so that streams and claims exist when the first
        # message arrives.
        nc = await broker.connect()
        replicas = settings.jetstream.replicas
        await ensure_streams(nc, replicas)
        await bound_deliveries(nc, policy.durables, settings.delivery.max_deliveries + 1)
        service.claims = jobs.JobClaims(await key_value(nc.jetstream(), jobs.BUCKET, replicas))
        await job_events_recorder(broker).bind(nc)

    @app.after_startup
    async def announce() -> None:
        # After every start-up hook, a service's warm-up (imports, tokenizer and model code)
        # included, and after the subscribers started: an instance that answers discovery
        # takes its first job as fast as its second.
        nc = await broker.connect()
        discovery["micro"] = await _announce(nc, service)
        discovery["advisories"] = await policy.watch_max_deliveries(nc)
        discovery["health"] = asyncio.create_task(_watch_health(nc, service, policy))
        structlog.get_logger().info(
            "service started", nats=_without_credentials(settings.nats_url), s3=settings.s3.endpoint)

    @app.on_shutdown
    async def stop_long_work() -> None:
        service.stopping.set()
        if micro := discovery.pop("micro", None):
            await micro.stop()
        if advisories := discovery.pop("advisories", None):
            await advisories.unsubscribe()
        if health := discovery.pop("health", None):
            health.cancel()

    return service


async def _announce(nc, service: Service):
    """Answer NATS service discovery (the micro protocol: `nats micro ls`, $SRV.PING/INFO/STATS)
    and `tunebus.v1.status.<service>` with what this instance is and is doing. The host (in
    Kubernetes the pod name) tells instances apart: a container's health probe looks for its own
    (shared/probe.py)."""
    micro = await add_service(
        nc, name=service.name, version=VERSION, description=f"tunebus {service.name}",
        metadata={"version": VERSION, "host": socket.gethostname(), **service.metadata},
        stats_handler=lambda _endpoint: {"active_jobs": sorted(service.active_jobs),
                                         "healthy": not service.problems,
                                         "problems": service.problems},
    )

    async def status(request) -> None:
        await request.respond(json.dumps(service.status()).encode())

    await micro.add_endpoint(name="status", subject=subjects.status(service.name), handler=status)
    return micro


async def _watch_health(nc, service: Service, policy) -> None:
    """Look at this instance's consumers every few seconds; keep what is wrong in `problems`."""
    stall_after = service.settings.delivery.stall_after_s
    watch = ConsumerWatch(stall_after)
    js = nc.jetstream()
    log = structlog.get_logger()
    while True:
        await asyncio.sleep(min(stall_after / 4, 15.0))
        try:
            problems = await watch.problems(js, policy.durables, busy=policy.in_flight > 0)
        except Exception as e:  # NATS away for a moment: keep the last verdict
            log.warning("could not read consumer state", error=repr(e))
            continue
        if problems != service.problems:
            (log.error if problems else log.info)(
                "consumer stalled" if problems else "consumers moving again", problems=problems)
        service.problems = problems


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def run(name: str, build) -> None:
    """`python -m tunebus.services.<name>`: run until SIGINT/SIGTERM, then stop cleanly."""
    settings = Settings()
    configure_logging(name, fmt=settings.log_format, level=settings.log_level)
    asyncio.run(build(settings).app.run())
