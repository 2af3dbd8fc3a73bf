"""`tunebus status JOB`, `tunebus jobs list`, `tunebus health`.

A job's status is rebuilt from its events, folded stage by stage: there is no database behind it,
the bus is the record. The events are read from the job-events bucket (the latest of each kind per
job, tunebus.shared.jobevents), so a status costs the same whatever the stream holds; a job the
bucket does not know, or `--replay`, is folded from the TUNEBUS_EVENTS stream and its dead
letters as before. What the services are doing right now (an evaluation in progress) comes from
NATS service discovery.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunebus.contracts import Envelope
from tunebus.shared.cli import client
from tunebus.shared.jobevents import JobEvents
from tunebus.shared.settings import Settings

STAGES = ("validate", "train", "evaluate", "register")
SERVICE_STAGE = {"dataset-validator": "validate", "trainer": "train", "evaluator": "evaluate",
                 "adapter-registry": "register"}
EXPECTED_SERVICES = tuple(SERVICE_STAGE)
BIND_TIMEOUT_S = 1.0  # an identity that may not read the job-events bucket reads the stream

console = Console()
err = Console(stderr=True)
jobs_app = typer.Typer(help="Jobs, rebuilt from the events on the bus.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root `tunebus` app."""
    app.command("status")(status)
    app.command("health")(health)
    app.add_typer(jobs_app, name="jobs")


# -- what a job's events say


@dataclass
class Stage:
    state: str = "pending"  # pending, running, done, skipped, failed, cancelled
    started: datetime | None = None
    finished: datetime | None = None
    detail: str = ""
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        end = self.finished or datetime.now(UTC)
        return (end - self.started).total_seconds()


@dataclass
class JobStatus:
    job_id: str
    adapter_name: str | None = None
    base_model: str | None = None
    method: str | None = None
    submitted_at: datetime | None = None
    updated_at: datetime | None = None
    stages: dict[str, Stage] = field(default_factory=lambda: {s: Stage() for s in STAGES})
    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    backend: str | None = None
    worker: str | None = None
    lora: dict | None = None
    hyperparameters: dict | None = None
    dataset: dict | None = None
    training: dict | None = None
    evaluation: dict | None = None
    ref: str | None = None
    aliases: list[str] = field(default_factory=list)
    # Later requests under this job_id that ran nothing (TrainingRefused), as "code: reason".
    refusals: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        for name in STAGES:
            stage = self.stages[name]
            if stage.state in ("failed", "cancelled") and name != "evaluate":
                return f"{stage.state} ({name})"
        if self.stages["register"].state == "done":
            return "done"
        for name in reversed(STAGES):
            if self.stages[name].state == "running":
                if name == "train" and self.step is not None and self.total_steps:
                    return f"training {self.step}/{self.total_steps}"
                return {"validate": "validating", "train": "training", "evaluate": "evaluating",
                        "register": "registering"}[name]
        return "queued"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = self.state
        for name, stage in self.stages.items():
            doc["stages"][name]["seconds"] = stage.seconds
        return json.loads(json.dumps(doc, default=str))


def fold(job_id: str, events: list[Envelope]) -> JobStatus:
    """The status of a job after its events, oldest first."""
    job = JobStatus(job_id)
    for event in events:
        _apply(job, event)
        job.updated_at = event.time
    return job


def _apply(job: JobStatus, event: Envelope) -> None:  # noqa: C901 - one case per event type
    data, at, stages = event.data, event.time, job.stages
    kind = event.type.removeprefix("tunebus.").removesuffix(".v1")
    match kind:
        case "training.requested":
            if job.submitted_at is not None:  # a later request under this job_id: it is refused
                return
            job.submitted_at = at
            job.adapter_name, job.base_model, job.method = data.adapter_name, data.base_model, data.method
            job.lora = data.adapter.model_dump(mode="json")
            job.hyperparameters = data.hyperparameters.model_dump(mode="json", exclude_none=True)
            _start(stages["validate"], at)
        case "dataset.validated":
            _start(stages["validate"], at)
            _finish(stages["validate"], at, "done", f"{data.dataset.format}, {data.dataset.rows} rows")
            job.dataset = data.dataset.model_dump(mode="json")
            if job.lora is None:  # the request event may have aged out of the stream
                request = data.request
                job.adapter_name, job.base_model = request.adapter_name, request.base_model
                job.lora = request.adapter.model_dump(mode="json")
                job.hyperparameters = request.hyperparameters.model_dump(mode="json", exclude_none=True)
        case "dataset.rejected":
            _start(stages["validate"], at)
            lines = [f"{e.file}:{e.line if e.line is not None else e.index} {e.field or ''} {e.message}"
                     for e in data.errors[:5]]
            _finish(stages["validate"], at, "failed", error="; ".join([data.reason, *lines]))
        case "training.refused":
            job.refusals.append(f"{data.code}: {data.reason}")
        case "training.started":
            _start(stages["train"], at, restart=True)
            job.total_steps, job.backend, job.worker = data.total_steps, data.backend, data.worker
        case "training.progress":
            _start(stages["train"], at)
            job.step, job.total_steps = data.step, data.total_steps
            job.train_loss = data.train_loss if data.train_loss is not None else job.train_loss
            job.val_loss = data.val_loss if data.val_loss is not None else job.val_loss
            job.tokens_per_second = data.tokens_per_second or job.tokens_per_second
            job.eta_seconds = data.eta_seconds
        case "training.completed":
            m = data.metrics
            _start(stages["train"], at)
            _finish(stages["train"], at, "done", f"loss {m.first_loss:.3f} → {m.final_loss:.3f}")
            job.training = m.model_dump(mode="json")
            job.step, job.tokens_per_second, job.train_loss = m.steps, m.tokens_per_second, m.final_loss
            job.total_steps = job.total_steps or m.steps
            job.eta_seconds = None
            if data.request.evaluation.enabled:
                _start(stages["evaluate"], at)
        case "training.failed":
            _finish(stages["train"], at, "failed", error=data.reason)
        case "training.cancelled":
            _finish(stages["train"], at, "cancelled", error=data.reason or "cancelled")
        case "evaluation.completed":
            _start(stages["evaluate"], at)
            if data.skipped:
                _finish(stages["evaluate"], at, "skipped", "turned off in the request")
            else:
                flag = "regressed: " + ", ".join(data.regressions) if data.regressed else "no regression"
                _finish(stages["evaluate"], at, "done", f"loss {data.before.loss:.3f} → "
                        f"{data.after.loss:.3f}; {flag}" if data.before and data.after else flag)
            job.evaluation = data.model_dump(mode="json", include={
                "before", "after", "relative_change", "improved", "regressed", "regressions",
                "report_uri", "report_html_uri", "probes", "skipped"})
            _start(stages["register"], at)
        case "evaluation.failed":
            _start(stages["evaluate"], at)
            _finish(stages["evaluate"], at, "failed", error=data.reason)
            _start(stages["register"], at)
        case "adapter.registered":
            _start(stages["register"], at)
            _finish(stages["register"], at, "done", data.entry.ref)
            job.ref, job.aliases = data.entry.ref, list(data.entry.aliases)
        case "deadletter":
            stage = stages[SERVICE_STAGE.get(data.service, "register")]
            _start(stage, at)
            _finish(stage, at, "failed", error=f"dead-lettered by {data.service}: {data.reason}")


def _start(stage: Stage, at: datetime, restart: bool = False) -> None:
    if stage.started is None or restart:
        stage.started, stage.finished = at, None
    if stage.state == "pending" or restart:
        stage.state = "running"


def _finish(stage: Stage, at: datetime, state: str, detail: str = "", error: str | None = None) -> None:
    stage.finished, stage.state, stage.detail, stage.error = at, state, detail, error
    stage.started = stage.started or at


def mark_live(job: JobStatus, instances: list[dict]) -> None:
    """Trust the services on what they are doing now: a stage they work on is running."""
    for instance in instances:
        stage = SERVICE_STAGE.get(instance.get("name", ""))
        if stage and job.job_id in instance.get("active_jobs", []) and job.stages[stage].state == "pending":
            job.stages[stage].state = "running"


def group_by_job(events: list[Envelope]) -> dict[str, list[Envelope]]:
    jobs: dict[str, list[Envelope]] = {}
    for event in events:
        if event.subject != "unknown":
            jobs.setdefault(event.subject, []).append(event)
    return jobs


# -- commands


def status(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    replay: Annotated[bool, typer.Option("--replay", help="Fold every event in the stream, "
                                         "not the job-events bucket.")] = False,
) -> None:
    """Every stage of a job: state, timings, errors, progress, LoRA settings and dataset."""
    job, found = client.run(_job_status(Settings(), job_id, replay=replay))
    if not found:
        err.print(f"[red]error:[/] no events of job {job_id} on the bus (it was never submitted, "
                  "or its events are older than the stream keeps)")
        raise typer.Exit(1)
    if as_json:
        console.print_json(json.dumps(job.to_dict()))
    else:
        _print_job(job)
    raise typer.Exit(1 if job.state.startswith(("failed", "cancelled")) else 0)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="Only the most recent N jobs.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON.")] = False,
    replay: Annotated[bool, typer.Option("--replay", help="Fold every event in the stream, "
                                         "not the job-events bucket.")] = False,
) -> None:
    """Jobs known to the bus, most recent first."""
    jobs = client.run(_all_jobs(Settings(), replay=replay))
    jobs = sorted(jobs, key=lambda j: j.updated_at or datetime.min.replace(tzinfo=UTC), reverse=True)[:limit]
    if as_json:
        console.print_json(json.dumps({"jobs": [j.to_dict() for j in jobs]}))
        return
    table = Table("job", "adapter", "state", "step", "loss", "tok/s", "registered", "updated")
    table.columns[0].no_wrap = True
    for j in jobs:
        table.add_row(
            j.job_id, j.adapter_name or "-", j.state,
            f"{j.step}/{j.total_steps}" if j.step is not None else "-",
            f"{j.train_loss:.3f}" if j.train_loss is not None else "-",
            f"{j.tokens_per_second:.0f}" if j.tokens_per_second else "-",
            j.ref or "-", _when(j.updated_at))
    console.print(table)


@jobs_app.command("reindex")
def jobs_reindex() -> None:
    """Fill the job-events bucket from the stream (once, after upgrading: jobs that ran before
    the services kept their events there). Needs an identity that may write it (admin)."""
    count = client.run(_reindex(Settings()))
    console.print(f"{count} events read from the stream into the job-events bucket")


def health(
    wait: Annotated[float, typer.Option(help="Seconds to collect discovery replies.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the instances as JSON.")] = False,
) -> None:
    """Every running service instance (NATS service discovery): health, version, backend,
    capabilities, active jobs, restarts. Exits 1 when one of the four services has no instance,
    or an instance is unhealthy (a stalled consumer)."""
    instances = client.run(_discover(Settings(), wait))
    missing = [s for s in EXPECTED_SERVICES if s not in {i.get("name") for i in instances}]
    unhealthy = [i for i in instances if not i.get("healthy", True)]
    if as_json:
        console.print_json(json.dumps({"instances": instances, "missing": missing,
                                       "healthy": not missing and not unhealthy}))
    else:
        table = Table("service", "instance", "health", "version", "backend", "active jobs",
                      "up since", "restarts", "capabilities")
        for i in instances:
            meta = i.get("metadata") or {}
            table.add_row(i.get("name", "?"), i.get("id", "?"),
                          "[green]ok[/]" if i.get("healthy", True) else "[red]stalled[/]",
                          i.get("version", "?"), meta.get("backend", "-"),
                          ", ".join(i["active_jobs"]) or "-", i.get("started", "?"),
                          meta.get("restarts", "-"), _short_capabilities(meta.get("capabilities")))
        console.print(table)
        for service in missing:
            err.print(f"[red]no instance of {service} answered[/]")
        for i in unhealthy:
            err.print(f"[red]{i.get('name')} {i.get('id')}: {'; '.join(i['problems'])}[/]")
    raise typer.Exit(1 if missing or unhealthy else 0)


# -- helpers


async def _job_status(settings: Settings, job_id: str, *, replay: bool = False) -> tuple[JobStatus, bool]:
    async with client.connect(settings) as nc:
        events = await _events_of(nc, job_id, replay)
        job = fold(job_id, events)
        if events and job.state not in ("done",) and not job.state.startswith(("failed", "cancelled")):
            mark_live(job, await client.discover(nc, wait=0.5))
    return job, bool(events)


async def _events_of(nc, job_id: str, replay: bool) -> list[Envelope]:
    """The job's events: from the bucket (a read per kind), else from the streams."""
    index = None if replay else await JobEvents.bind(nc.jetstream(), timeout=BIND_TIMEOUT_S)
    if index is not None and (events := await index.of_job(job_id)):
        return events
    return await client.replay(nc, job_id)


async def _all_jobs(settings: Settings, *, replay: bool = False) -> list[JobStatus]:
    async with client.connect(settings) as nc:
        index = None if replay else await JobEvents.bind(nc.jetstream(), timeout=BIND_TIMEOUT_S)
        jobs = await index.all_jobs() if index is not None else {}
        if not jobs:  # no bucket, not readable by this identity, or nothing recorded yet
            jobs = group_by_job(await client.replay(nc))
    return [fold(job_id, evs) for job_id, evs in jobs.items()]


async def _reindex(settings: Settings) -> int:
    async with client.connect(settings) as nc:
        index = await JobEvents.bind(nc.jetstream())
        if index is None:
            err.print("[red]error:[/] the job-events bucket is missing or this identity may not use it")
            raise typer.Exit(1)
        events = await client.replay(nc)  # oldest first: each kind's latest is written last
        for event in events:
            await index.record(event.model_dump_json().encode())
    return len(events)


async def _discover(settings: Settings, wait: float) -> list[dict]:
    async with client.connect(settings) as nc:
        return await client.discover(nc, wait)


def _print_job(job: JobStatus) -> None:
    console.print(f"[bold]{job.job_id}[/]  {job.adapter_name or '?'} on {job.base_model or '?'}"
                  f"  [bold]{job.state}[/]")
    table = Table("stage", "state", "started", "took", "detail")
    for name, stage in job.stages.items():
        colour = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(stage.state, "")
        took = f"{stage.seconds:.1f}s" if stage.seconds is not None else "-"
        detail = stage.error or stage.detail
        table.add_row(name, f"[{colour}]{stage.state}[/]" if colour else stage.state,
                      _when(stage.started), took, detail)
    console.print(table)
    if job.step is not None:
        loss = f"loss {job.train_loss:.4f}" if job.train_loss is not None else ""
        val = f", val loss {job.val_loss:.4f}" if job.val_loss is not None else ""
        speed = f", {job.tokens_per_second:.0f} tok/s" if job.tokens_per_second else ""
        eta = f", ETA {job.eta_seconds:.0f}s" if job.eta_seconds else ""
        console.print(f"step {job.step}/{job.total_steps}  {loss}{val}{speed}{eta}"
                      + (f"  ({job.backend} on {job.worker})" if job.worker else ""))
    if job.lora:
        lora = job.lora
        console.print(f"LoRA: {lora['type']} rank {lora['rank']}, alpha {lora['alpha']}, dropout "
                      f"{lora['dropout']}, modules {lora.get('target_modules') or 'default'}; "
                      f"hyperparameters {job.hyperparameters}")
    if job.dataset:
        d = job.dataset
        console.print(f"dataset: {d['format']}, {d['rows']} rows → train {d['train_rows']} / valid "
                      f"{d['valid_rows']}, dropped {d.get('dropped', 0)}, sha256 {d['sha256'][:12]}…")
    for refusal in job.refusals:
        console.print(f"[yellow]refused a later request[/] {refusal}")
    if job.ref:
        aliases = f" ({', '.join(job.aliases)})" if job.aliases else ""
        console.print(f"registered: {job.ref}{aliases}")
    if job.evaluation and job.evaluation.get("report_html_uri"):
        console.print(f"evaluation report: {job.evaluation['report_html_uri']}")


def _when(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _short_capabilities(text: str | None) -> str:
    if not text:
        return "-"
    try:
        caps = json.loads(text)
    except ValueError:
        return text
    return "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in caps.items())
