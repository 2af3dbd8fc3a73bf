"""How a tunebus service talks to NATS: streams, durable consumers, publishing events.

Every service builds its broker with `create_broker` and its consumers with `consume`, so all of
them share one delivery policy (see `delivery.py`) and declare the same streams the same way.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import nats
import structlog
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.publisher.usecase import LogicPublisher
from faststream.security import SASLPlaintext
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from tunebus.contracts import Envelope, subjects

from .delivery import DeliveryPolicy
from .jobevents import JobEventsRecorder
from .settings import Settings

DAY = 24 * 3600

# Events are facts: kept for 30 days so job status can be rebuilt from them; a publish repeated
# with the same event id (Nats-Msg-Id) inside the duplicate window is stored once.
STREAMS = [
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=subjects.EVENTS_STREAM_SUBJECTS,
        max_age=30 * DAY,
        duplicate_window=600,
        discard=DiscardPolicy.OLD,
    ),
    StreamConfig(
        name=subjects.DEAD_LETTER_STREAM,
        subjects=subjects.DEAD_LETTER_STREAM_SUBJECTS,
        max_age=90 * DAY,
        duplicate_window=600,
    ),
    StreamConfig(
        name=subjects.ADVISORY_STREAM,
        subjects=subjects.ADVISORY_STREAM_SUBJECTS,
        max_age=7 * DAY,
    ),
]
EVENTS = JStream(subjects.EVENTS_STREAM, declare=False)


# Key-value buckets and the history each keeps per key; how long a key lives (0: for ever).
KV_BUCKETS = {subjects.JOBS_BUCKET: 1, subjects.REGISTRY_BUCKET: 5, subjects.JOB_EVENTS_BUCKET: 1}
KV_TTL_S = {subjects.JOB_EVENTS_BUCKET: 30 * DAY}  # job events age out with the events stream


async def bootstrap(nc: nats.NATS, replicas: int = 1) -> None:
    """Declare the streams and key-value buckets, or bring them up to date: run once per
    deployment by an identity allowed to (`admin`: `tunebus stack up`, compose's `nats-init`)."""
    await ensure_streams(nc, replicas, update=True)
    js = nc.jetstream()
    for bucket, history in KV_BUCKETS.items():
        await js.create_key_value(bucket=bucket, history=history, replicas=replicas,
                                  ttl=KV_TTL_S.get(bucket))


async def ensure_streams(nc: nats.NATS, replicas: int = 1, *, update: bool = False) -> None:
    """Make sure the streams exist. A service creates a missing one only where its identity may
    (a bus without permissions); on a secured bus the bootstrap has declared them."""
    js = nc.jetstream()
    for config in STREAMS:
        config = dataclasses.replace(config, num_replicas=replicas)
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except BadRequestError:  # another service created it meanwhile
                pass
        if update:
            await js.update_stream(config)


async def key_value(js, bucket: str, replicas: int = 1):
    """The bucket, bound if it exists (the bootstrap declared it), else created with its history."""
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BucketNotFoundError):
        return await js.create_key_value(bucket=bucket, history=KV_BUCKETS.get(bucket, 1),
                                         replicas=replicas, ttl=KV_TTL_S.get(bucket))


class Bucket:
    """A key-value bucket, named when a service is built and opened when it connects.

    What keeps its state in one (job claims, the registry) is made with the service and handed to
    the handlers that use it, so the handlers are plain functions of plain objects (a test hands
    them an in-memory bucket); only the connection arrives later, at start-up (`open`).
    """

    def __init__(self, name: str, replicas: int = 1) -> None:
        self.name = name
        self.replicas = replicas
        self.kv: KeyValue | None = None  # set by open()
        self.js: JetStreamContext | None = None  # the bucket's stream is read directly too

    async def open(self, js: JetStreamContext) -> Bucket:
        self.js = js
        self.kv = await key_value(js, self.name, self.replicas)
        return self


async def bound_deliveries(nc: nats.NATS, durables: set[str], max_deliver: int) -> None:
    """Give consumers created before deliveries were bounded (max_deliver -1) the bound: JetStream
    binds to an existing durable consumer as it is, whatever the subscriber's config says."""
    js = nc.jetstream()
    for durable in sorted(durables):
        try:
            info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        except NotFoundError:
            continue  # created with the bound when its subscriber starts
        if info.config.max_deliver != max_deliver:
            await js.add_consumer(subjects.EVENTS_STREAM, info.config.evolve(max_deliver=max_deliver))


def nats_options(settings: Settings) -> dict[str, Any]:
    """The servers and credentials of a connection, as `nats.connect` and `NatsBroker` take them."""
    auth = settings.nats
    options: dict[str, Any] = {"servers": [u.strip() for u in settings.nats_url.split(",") if u.strip()]}
    if auth.user:
        options["user"] = auth.user
        options["password"] = auth.password.get_secret_value() if auth.password else ""
    if auth.token:
        options["token"] = auth.token.get_secret_value()
    if auth.nkey_seed_file:
        options["nkeys_seed"] = str(auth.nkey_seed_file)
    if auth.creds_file:
        options["user_credentials"] = str(auth.creds_file)
    options["inbox_prefix"] = inbox_prefix(settings)
    return options


def inbox_prefix(settings: Settings) -> str:
    """Where replies to this identity arrive: `_INBOX.<user>`, which only that user may read."""
    auth = settings.nats
    return auth.inbox_prefix or (f"_INBOX.{auth.user}" if auth.user else "_INBOX")


def create_broker(settings: Settings, service: str) -> tuple[NatsBroker, DeliveryPolicy]:
    policy = DeliveryPolicy(service, settings.delivery)
    recorder = JobEventsRecorder(service)
    options = nats_options(settings)
    if "user" in options:  # FastStream takes user and password as its security object
        options["security"] = SASLPlaintext(username=options.pop("user"), password=options.pop("password"))
    broker = NatsBroker(
        options.pop("servers"),
        **options,
        name=f"tunebus-{service}",
        middlewares=[policy, recorder],
        logger=structlog.get_logger("faststream"),
        graceful_timeout=settings.delivery.ack_wait_s,
        # Keep trying while NATS restarts instead of giving up after a few attempts.
        max_reconnect_attempts=-1,
    )
    policy.bind(broker)
    return broker, policy


def job_events_recorder(broker: NatsBroker) -> JobEventsRecorder:
    """The broker's recorder of job events (bound to its bucket when the service connects)."""
    return next(m for m in broker.middlewares if isinstance(m, JobEventsRecorder))


def consume(broker: NatsBroker, subject: str, *, durable: str, settings: Settings, **kwargs: Any):
    """A durable pull consumer on the events stream: one message at a time per worker, acked by
    the delivery policy, never by FastStream's default (which terminates on any exception)."""
    policy = next(m for m in broker.middlewares if isinstance(m, DeliveryPolicy))
    policy.durables.add(durable)
    return broker.subscriber(
        subject,
        stream=EVENTS,
        durable=durable,
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        config=ConsumerConfig(
            ack_wait=settings.delivery.ack_wait_s,
            # The delivery policy dead-letters a message at its last attempt; one more lets it
            # see that attempt. A message whose handler never returns (it kills the process)
            # reaches this bound, and the policy's advisory watch dead-letters it.
            max_deliver=settings.delivery.max_deliveries + 1,
            deliver_policy=DeliverPolicy.ALL,
        ),
        ack_policy=AckPolicy.MANUAL,
        decoder=decode_json,
        inbox_prefix=f"{inbox_prefix(settings)}.".encode(),
        **kwargs,
    )


async def decode_json(msg: Any) -> Any:
    # Accept any content type (external publishers may send application/cloudevents+json or none).
    return json.loads(msg.body)


def publishes(broker: NatsBroker, event: type[Envelope], subject: str) -> LogicPublisher:
    """A documented publisher of one event type (it shows in the AsyncAPI document)."""
    return broker.publisher(subject, stream=EVENTS, schema=event)


async def publish(publisher: LogicPublisher, event: Envelope) -> None:
    """Publish an event so that JetStream stores it once, however often this is repeated."""
    await publisher.publish(
        event.model_dump_json().encode(),
        headers={
            "Nats-Msg-Id": event.id,
            "content-type": "application/json",
            "ce-type": event.type,
            "ce-subject": event.subject,
        },
    )


def derived_event_id(cause: Envelope, what: str, *parts: object) -> str:
    """An event id fixed by its cause: if a handler runs twice for the same incoming event, its
    output gets the same id twice, and JetStream's duplicate window drops the second copy."""
    name = ":".join([cause.id, what, *map(str, parts)])
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunebus:{name}"))
