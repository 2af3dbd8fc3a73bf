"""The dashboard's web app: JSON endpoints over the bus and a server-sent event stream of it,
under a single page (static/) that draws them. A client of the bus like the CLI: it acts with
the identity it was started with, and the NATS server decides what that identity may do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tunebus.contracts import (
    AdapterList,
    AdapterReply,
    DatasetSpec,
    DownloadUrls,
    GetAdapter,
    GetDownloadUrls,
    Hyperparameters,
    ListAdapters,
    TrainingRequested,
    subjects,
)
from tunebus.contracts.catalog import event_for_subject
from tunebus.contracts.dataset import DatasetReport, ValidateDataset
from tunebus.contracts.registry import AliasReply, DeleteAdapter, PromoteAdapter, RollbackAdapter
from tunebus.shared.cli import client
from tunebus.shared.cli.deadletters import matches
from tunebus.shared.cli.status import fold, group_by_job
from tunebus.shared.identities import ROLES
from tunebus.shared.jobevents import JobEvents
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import Settings

from . import views

STATIC = Path(__file__).parent / "static"
# A file name kept from an upload: what S3 keys and shells read without quoting.
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_UPLOAD = 512 * 1024 * 1024


def create_app(settings: Settings) -> Starlette:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_app):
        async with client.connect(settings) as nc:
            state["nc"] = nc
            yield

    def bus() -> nats.NATS:
        return state["nc"]

    async def ask(subject, query, reply):
        try:
            return await client.ask(bus(), subject, query, reply)
        except client.PermissionDenied:
            raise
        except (NoRespondersError, NatsTimeout):
            raise Unavailable(f"no service answered on {subject}") from None

    # -- pages and identity

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def whoami(_request: Request) -> Response:
        user = settings.nats.user or "anonymous"
        return JSONResponse({"user": user, "nats": _without_credentials(settings.nats_url),
                             "operator": may(user, subjects.REGISTRY_PROMOTE),
                             "submitter": may(user, subjects.TRAINING_REQUESTED)})

    # -- jobs

    async def jobs(_request: Request) -> Response:
        return JSONResponse({"jobs": views.jobs_table(await _all_jobs(bus()))})

    async def job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        events = await _events_of(bus(), job_id)
        if not events:
            return JSONResponse({"error": f"no events of job {job_id} on the bus"}, status_code=404)
        return JSONResponse(views.job_page(fold(job_id, events), events))

    async def job_curve(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        since = fold(job_id, await _events_of(bus(), job_id)).submitted_at
        events = await _progress_of(bus(), job_id, since)
        return JSONResponse({"points": views.curve(events)})

    async def job_report(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        uri = views.report_uri(fold(job_id, await _events_of(bus(), job_id)))
        if not uri:
            return HTMLResponse("<p>No evaluation report for this job (yet).</p>", status_code=404)
        html = await asyncio.to_thread(ObjectStore(settings.s3).get_bytes, uri)
        # Shown in a sandboxed frame; it is the evaluator's own self-contained page.
        return HTMLResponse(html, headers={"Content-Security-Policy": "sandbox allow-scripts"})

    async def live(request: Request) -> Response:
        return EventSourceResponse(_live_events(bus(), request), ping=10)

    # -- adapters

    async def adapters(_request: Request) -> Response:
        found, query = [], ListAdapters(limit=1000)
        while True:
            page = await ask(subjects.REGISTRY_LIST, query, AdapterList)
            if page.error:
                return JSONResponse({"error": page.error}, status_code=502)
            found += page.adapters
            if page.next_cursor is None:
                break
            query = query.model_copy(update={"cursor": page.next_cursor})
        return JSONResponse({"adapters": views.adapters_by_name(found)})

    async def adapter(request: Request) -> Response:
        ref = request.path_params["ref"]
        reply = await ask(subjects.REGISTRY_GET, GetAdapter(ref=ref), AdapterReply)
        if reply.error or reply.entry is None:
            return JSONResponse({"error": reply.error or f"no adapter {ref}"}, status_code=404)
        layouts = {layout: await ask(subjects.REGISTRY_DOWNLOAD_URL,
                                     GetDownloadUrls(ref=reply.entry.ref, format=layout), DownloadUrls)
                   for layout in sorted(reply.entry.formats)}
        return JSONResponse({**views.adapter_row(reply.entry), "downloads": views.downloads(layouts)})

    async def promote(request: Request) -> Response:
        body = await request.json()
        return _alias(await ask(subjects.REGISTRY_PROMOTE, PromoteAdapter(
            ref=body["ref"], reason=body.get("reason", "")), AliasReply))

    async def rollback(request: Request) -> Response:
        body = await request.json()
        return _alias(await ask(subjects.REGISTRY_ROLLBACK, RollbackAdapter(
            name=body["name"], reason=body.get("reason", "")), AliasReply))

    async def delete(request: Request) -> Response:
        body = await request.json()
        reply = await ask(subjects.REGISTRY_DELETE, DeleteAdapter(
            ref=body["ref"], reason=body.get("reason", "")), AdapterReply)
        if reply.error:
            return JSONResponse({"error": reply.error}, status_code=400)
        return JSONResponse({"deleted": reply.entry.ref})

    # -- services and dead letters

    async def services(_request: Request) -> Response:
        instances = await client.discover(bus(), wait=0.7)
        return JSONResponse({"services": [views.service_row(i) for i in instances]})

    async def dead_letters(request: Request) -> Response:
        q = request.query_params
        found = [d for d in await client.dead_letters(bus())
                 if matches(d, q.get("service") or None, q.get("reason") or None, q.get("job") or None)]
        return JSONResponse({"dead_letters": [views.dead_letter_row(d) for d in reversed(found)]})

    async def dead_letter(request: Request) -> Response:
        sequence = request.path_params["sequence"]
        stored = await client.dead_letter(bus(), sequence)
        if stored is None:
            return JSONResponse({"error": f"no dead letter with id {sequence}"}, status_code=404)
        return JSONResponse(views.dead_letter_detail(stored))

    async def replay(request: Request) -> Response:
        sequence = request.path_params["sequence"]
        reason = (await request.json()).get("reason", "") if await request.body() else ""
        try:
            reply = await client.replay_dead_letter(bus(), sequence, reason)
        except (NoRespondersError, NatsTimeout):
            raise Unavailable("the service that publishes this subject did not answer") from None
        if reply.error:
            return JSONResponse({"error": reply.error}, status_code=400)
        return JSONResponse(reply.model_dump(mode="json"))

    # -- submitting

    async def upload(request: Request) -> Response:
        form = await request.form(max_files=1, max_part_size=MAX_UPLOAD)
        upload = form.get("dataset")
        if upload is None or not getattr(upload, "filename", None):
            return JSONResponse({"error": "no file in the form field `dataset`"}, status_code=400)
        job_id = form.get("job_id") or f"job-{uuid.uuid4().hex[:12]}"
        name = UNSAFE.sub("_", Path(upload.filename).name) or "dataset.jsonl"
        uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/{name}"
        data = await upload.read()
        await asyncio.to_thread(ObjectStore(settings.s3).put_bytes, uri, data)
        return JSONResponse({"job_id": job_id, "uri": uri, "size": len(data)})

    async def validate(request: Request) -> Response:
        body = await request.json()
        query = ValidateDataset(uri=body["uri"], method=body.get("method") or None,
                                base_model=body.get("base_model") or None)
        report = await ask(subjects.VALIDATOR_VALIDATE, query, DatasetReport)
        return JSONResponse(report.model_dump(mode="json"))

    async def submit(request: Request) -> Response:
        body = await request.json()
        hyper = {k: body[k] for k in ("iters", "epochs", "batch_size", "learning_rate",
                                       "max_seq_length") if body.get(k) not in (None, "")}
        adapter = {"rank": int(body["rank"])} if body.get("rank") else {}
        try:
            training = TrainingRequested(
                job_id=body.get("job_id") or f"job-{uuid.uuid4().hex[:12]}",
                adapter_name=body["adapter_name"], base_model=body["base_model"],
                method=body.get("method") or "sft", backend=body.get("backend") or "auto",
                dataset=DatasetSpec(uri=body["dataset_uri"]),
                hyperparameters=Hyperparameters(**hyper), adapter=adapter)
        except (KeyError, ValueError) as e:
            return JSONResponse({"error": f"not a valid request: {e}"}, status_code=400)
        event = await client.submit(bus(), training)
        return JSONResponse({"job_id": training.job_id, "event_id": event.id})

    async def no_icon(_request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", index),
        Route("/favicon.ico", no_icon),
        Route("/api/whoami", whoami),
        Route("/api/jobs", jobs),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/curve", job_curve),
        Route("/api/jobs/{job_id}/report", job_report),
        Route("/api/live", live),
        Route("/api/adapters", adapters),
        Route("/api/adapters/promote", promote, methods=["POST"]),
        Route("/api/adapters/rollback", rollback, methods=["POST"]),
        Route("/api/adapters/delete", delete, methods=["POST"]),
        Route("/api/adapters/{ref}", adapter),
        Route("/api/services", services),
        Route("/api/deadletters", dead_letters),
        Route("/api/deadletters/{sequence:int}", dead_letter),
        Route("/api/deadletters/{sequence:int}/replay", replay, methods=["POST"]),
        Route("/api/datasets", upload, methods=["POST"]),
        Route("/api/validate", validate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        client.PermissionDenied: _refused, Unavailable: _unavailable})


class Unavailable(Exception):
    """No service answered a request the page made."""


def may(user: str, subject: str) -> bool:
    """Whether the role `user` may publish `subject`, for showing or hiding buttons only (the
    server decides); an identity that is not one of tunebus's roles is shown everything."""
    role = ROLES.get(user)
    if role is None:
        return True
    return ">" in role.publish or subject in role.publish


async def _refused(_request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"refused: {exc}"}, status_code=403)


async def _unavailable(_request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=503)


def _alias(reply: AliasReply) -> Response:
    if reply.error:
        return JSONResponse({"error": reply.error}, status_code=400)
    return JSONResponse(reply.model_dump(mode="json"))


def _without_credentials(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


async def _all_jobs(nc):
    index = await JobEvents.bind(nc.jetstream(), timeout=1.0)
    found = await index.all_jobs() if index is not None else {}
    if not found:
        found = group_by_job(await client.replay(nc))
    return [fold(job_id, events) for job_id, events in found.items()]


async def _events_of(nc, job_id: str):
    index = await JobEvents.bind(nc.jetstream(), timeout=1.0)
    if index is not None and (events := await index.of_job(job_id)):
        return events
    return await client.replay(nc, job_id)


async def _progress_of(nc, job_id: str, since: datetime | None):
    """The job's progress events, from the stream (the bucket keeps the latest only), read from
    the job's request on: not every job's curve since the stream began."""
    js = nc.jetstream()
    try:
        last = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    except Exception:  # noqa: BLE001 - no stream: no curve
        return []
    if not last:
        return []
    events = []
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL) if since is None else ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=since.astimezone(UTC).isoformat().replace("+00:00", "Z"))
    sub = await js.subscribe(subjects.TRAINING_PROGRESS, stream=subjects.EVENTS_STREAM,
                             ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except NatsTimeout:
                break
            try:
                event = event_for_subject(msg.subject).model_validate_json(msg.data)
            except (KeyError, ValueError):
                event = None
            if event is not None and event.subject == job_id:
                events.append(event)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return events


async def _live_events(nc, request: Request):
    """Every event published from now on, dead letters included, as it arrives."""
    js = nc.jetstream()
    queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)

    async def collect(msg) -> None:
        if not queue.full():
            queue.put_nowait(msg)

    subs = [await js.subscribe(f"{subjects.PREFIX}.>", stream=stream, ordered_consumer=True,
                               deliver_policy=DeliverPolicy.NEW, cb=collect)
            for stream in (subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM)]
    try:
        yield {"event": "ready", "data": "{}"}
        while not await request.is_disconnected():
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=5)
            except TimeoutError:
                continue
            try:
                event = event_for_subject(msg.subject).model_validate_json(msg.data)
            except (KeyError, ValueError):
                continue
            yield {"event": "bus", "data": json.dumps(views.live_event(event))}
    finally:
        for sub in subs:
            # At shutdown the connection may be draining already, which ends them too.
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
