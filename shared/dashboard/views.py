"""What each dashboard page shows, as plain JSON-ready dicts built from contracts: no I/O here,
so every page's content is unit-tested without a bus (tests/unit/test_dashboard_views.py)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from tunebus.contracts import Envelope
from tunebus.contracts.registry import AdapterEntry, DownloadUrls
from tunebus.shared.cli.client import StoredDeadLetter
from tunebus.shared.cli.deadletters import body_text
from tunebus.shared.cli.status import STAGES, JobStatus

# A job's events that are not a step of its curve: the page reloads its detail on each.
CURVE_EVENT = "tunebus.training.progress.v1"


def job_row(job: JobStatus, now: datetime | None = None) -> dict[str, Any]:
    """One line of the jobs table."""
    now = now or datetime.now(UTC)
    submitted = job.submitted_at or job.updated_at
    return {
        "job_id": job.job_id,
        "state": job.state,
        "phase": phase(job),
        "adapter": job.adapter_name,
        "method": job.method,
        "backend": job.backend,
        "step": job.step,
        "total_steps": job.total_steps,
        "loss": job.train_loss,
        "tokens_per_second": job.tokens_per_second,
        "ref": job.ref,
        "age_seconds": (now - submitted).total_seconds() if submitted else None,
        "updated_at": job.updated_at.isoformat() if job.updated_at else None,
    }


def phase(job: JobStatus) -> str:
    """The one word a colour is chosen by: done, failed, cancelled, running or queued."""
    state = job.state
    if state == "done":
        return "done"
    if state.startswith(("failed", "cancelled")):
        return state.split()[0]
    return "queued" if state == "queued" else "running"


def jobs_table(jobs: list[JobStatus], limit: int = 200, now: datetime | None = None) -> list[dict]:
    """The most recently updated jobs first."""
    latest = sorted(jobs, key=lambda j: j.updated_at or datetime.min.replace(tzinfo=UTC), reverse=True)
    return [job_row(j, now) for j in latest[:limit]]


def job_page(job: JobStatus, events: list[Envelope]) -> dict[str, Any]:
    """A job's page: the stage timeline, resolved arguments, dataset, evaluation, registration.
    `events` are the job's latest events of each kind (the job-events bucket's)."""
    started = _latest(events, "tunebus.training.started.v1")
    completed = _latest(events, "tunebus.training.completed.v1")
    evaluation = job.evaluation or {}
    return {
        **job_row(job),
        "base_model": job.base_model,
        "worker": job.worker,
        "val_loss": job.val_loss,
        "eta_seconds": job.eta_seconds,
        "timeline": [
            {"stage": name, "state": stage.state, "detail": stage.error or stage.detail,
             "started": stage.started.isoformat() if stage.started else None,
             "finished": stage.finished.isoformat() if stage.finished else None,
             "seconds": stage.seconds}
            for name, stage in ((n, job.stages[n]) for n in STAGES)
        ],
        "resolved_args": (completed.data.resolved_args if completed else
                          started.data.resolved_args if started else None),
        "lora": job.lora,
        "hyperparameters": job.hyperparameters,
        "dataset": job.dataset,
        "training": job.training,
        "evaluation": {k: evaluation.get(k) for k in
                       ("before", "after", "relative_change", "improved", "regressed",
                        "regressions", "skipped")} if evaluation else None,
        "has_report": bool(evaluation.get("report_html_uri")),
        "refusals": job.refusals,
        "aliases": job.aliases,
    }


def report_uri(job: JobStatus) -> str | None:
    return (job.evaluation or {}).get("report_html_uri")


def curve_point(event: Envelope) -> dict[str, Any] | None:
    """A training.progress event as one point of the loss / learning-rate / reward chart."""
    if event.type != CURVE_EVENT:
        return None
    d = event.data
    return {"step": d.step, "total_steps": d.total_steps, "train_loss": d.train_loss,
            "val_loss": d.val_loss, "learning_rate": d.learning_rate, "reward": d.reward,
            "tokens_per_second": d.tokens_per_second, "eta_seconds": d.eta_seconds}


def curve(events: list[Envelope]) -> list[dict[str, Any]]:
    """Every progress point of a job, by step (a resumed run repeats steps: the later wins)."""
    points = {p["step"]: p for e in events if (p := curve_point(e))}
    return [points[step] for step in sorted(points)]


def live_event(event: Envelope) -> dict[str, Any]:
    """What the server-sent event stream says about one bus event: enough to draw a point or
    to know which job to reload."""
    doc: dict[str, Any] = {"type": event.type, "job_id": event.subject, "time": event.time.isoformat()}
    if point := curve_point(event):
        doc["point"] = point
    return doc


def adapter_row(entry: AdapterEntry) -> dict[str, Any]:
    """One version in the adapters list: what it is, how it did, where it came from."""
    ev = entry.evaluation
    return {
        "ref": entry.ref, "name": entry.name, "version": entry.version,
        "aliases": entry.aliases, "deleted": entry.deleted,
        "method": entry.method, "backend": entry.backend, "format": entry.format,
        "formats": sorted(entry.formats),
        "created_at": entry.created_at.isoformat(),
        "final_loss": entry.training.final_loss,
        "eval_loss_before": ev.before.loss if ev and ev.before else None,
        "eval_loss_after": ev.after.loss if ev and ev.after else None,
        "relative_change": ev.relative_change if ev else {},
        "regressed": bool(ev and ev.regressed),
        "lineage": {"job_id": entry.job_id, "base_model": entry.base_model,
                    "base_model_revision": entry.base_model_revision,
                    "dataset_uri": entry.dataset_uri, "dataset_format": entry.dataset_format,
                    "dataset_rows": entry.dataset_rows, "tags": entry.tags},
        "promotion": entry.promotion.model_dump(mode="json") if entry.promotion else None,
    }


def adapters_by_name(entries: list[AdapterEntry]) -> list[dict[str, Any]]:
    """Adapters grouped by name, newest version first within each."""
    names: dict[str, list[AdapterEntry]] = {}
    for entry in entries:
        names.setdefault(entry.name, []).append(entry)
    return [{"name": name, "versions": [adapter_row(e) for e in
                                        sorted(versions, key=lambda e: e.version, reverse=True)]}
            for name, versions in sorted(names.items())]


def downloads(layouts: dict[str, DownloadUrls]) -> dict[str, list[dict[str, Any]]]:
    """Per layout (mlx, peft), each file's presigned link, size and sha256."""
    return {layout: [{"file": name, "url": url, "size": reply.sizes.get(name),
                      "sha256": reply.sha256.get(name)} for name, url in sorted(reply.urls.items())]
            for layout, reply in layouts.items() if not reply.error}


def service_row(instance: dict[str, Any]) -> dict[str, Any]:
    """A service instance as discovery tells it: health, counters, what it is doing."""
    meta = instance.get("metadata") or {}
    endpoints = [{"name": e.get("name"), "subject": e.get("subject"),
                  "requests": e.get("num_requests", 0), "errors": e.get("num_errors", 0),
                  "average_ms": (e.get("average_processing_time") or 0) / 1e6}
                 for e in instance.get("endpoints") or []]
    return {"name": instance.get("name"), "id": instance.get("id"),
            "version": instance.get("version"), "healthy": instance.get("healthy", True),
            "problems": instance.get("problems", []), "active_jobs": instance.get("active_jobs", []),
            "started": instance.get("started"), "backend": meta.get("backend"),
            "host": meta.get("host"), "restarts": meta.get("restarts"), "endpoints": endpoints}


def dead_letter_row(stored: StoredDeadLetter) -> dict[str, Any]:
    letter = stored.letter
    return {"id": stored.sequence, "time": stored.event.time.isoformat(), "service": letter.service,
            "job_id": letter.job_id, "original_subject": letter.original_subject,
            "reason": letter.reason, "deliveries": letter.deliveries,
            "replay_of": letter.headers.get("Tunebus-Replay-Of")}


def dead_letter_detail(stored: StoredDeadLetter) -> dict[str, Any]:
    letter = stored.letter
    return {**dead_letter_row(stored), "errors": letter.errors, "headers": letter.headers,
            "body": body_text(letter), "body_complete": letter.body_complete,
            "body_size": letter.body_size or len(base64.b64decode(letter.body_base64)),
            "body_sha256": letter.body_sha256, "stream_sequence": letter.stream_sequence}


def _latest(events: list[Envelope], event_type: str) -> Envelope | None:
    return next((e for e in reversed(events) if e.type == event_type), None)
