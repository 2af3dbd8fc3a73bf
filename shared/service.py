"""The frame every tunebus service shares: settings, broker, object store, job claims."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker

from . import jobs
from .bus import create_broker, ensure_streams
from .logging import configure_logging
from .objectstore import ObjectStore
from .settings import Settings


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

    @property
    def source(self) -> str:
        """The CloudEvents `source` of everything this service publishes."""
        return f"tunebus/{self.name}"


def create_service(name: str, settings: Settings) -> Service:
    broker, _ = create_broker(settings, name)
    app = FastStream(broker, logger=structlog.get_logger("faststream"))
    service = Service(name, settings, broker, app, ObjectStore(settings.s3))

    @app.on_startup
    async def connect() -> None:
        # Connect before the subscribers start, so that streams and claims exist when the first
        # message arrives.
        nc = await broker.connect()
        await ensure_streams(nc)
        service.claims = jobs.JobClaims(await broker.key_value(jobs.BUCKET, history=1))
        structlog.get_logger().info(
            "service started", nats=_without_credentials(settings.nats_url), s3=settings.s3.endpoint)

    @app.on_shutdown
    async def stop_long_work() -> None:
        service.stopping.set()

    return service


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
