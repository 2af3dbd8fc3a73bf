"""The dashboard's view models (tunebus.shared.dashboard.views): what each page shows, from
the golden v1 events, with no bus."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tunebus.contracts import DeadLetter, DeadLetterEvent
from tunebus.contracts.catalog import EVENTS
from tunebus.contracts.registry import AdapterEntry, DownloadUrls
from tunebus.shared.cli.client import StoredDeadLetter
from tunebus.shared.cli.status import fold
from tunebus.shared.dashboard import views

EXAMPLES = Path(__file__).parents[2] / "contracts" / "examples" / "v1"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
BY_TYPE = {cls.event_type(): cls for cls in EVENTS.values()}


def event(kind: str, seconds: float = 0, **data):
    """The golden example of `kind`, at T0 + seconds, with `data` fields replaced."""
    doc = json.loads((EXAMPLES / f"tunebus.{kind}.v1.json").read_text())
    doc["time"] = (T0 + timedelta(seconds=seconds)).isoformat()
    doc["data"].update(data)
    return BY_TYPE[doc["type"]].model_validate(doc)


def running_job():
    return [event("training.requested"), event("dataset.validated", 1), event("training.started", 2),
            event("training.progress", 3, step=10, total_steps=100, train_loss=2.5)]


def finished_job():
    return [*running_job(), event("training.completed", 10), event("evaluation.completed", 12),
            event("adapter.registered", 13)]


def test_a_training_job_row_shows_its_step_loss_and_age():
    job = fold("job-2026-11-21-0001", running_job())
    row = views.job_row(job, now=T0 + timedelta(seconds=90))
    assert row["state"] == "training 10/100" and row["phase"] == "running"
    assert (row["step"], row["total_steps"], row["loss"]) == (10, 100, 2.5)
    assert row["age_seconds"] == 90 and row["adapter"] and row["backend"]


def test_phases_are_done_failed_and_queued():
    assert views.job_row(fold("j", finished_job()))["phase"] == "done"
    failed = fold("j", [event("training.requested"), event("dataset.rejected", 1)])
    assert views.job_row(failed)["phase"] == "failed"
    assert views.job_row(fold("j", []))["phase"] == "queued"


def test_the_jobs_table_puts_the_latest_updated_first_and_stops_at_the_limit():
    old = fold("old", [event("training.requested", 0)])
    new = fold("new", [event("training.requested", 60)])
    assert [r["job_id"] for r in views.jobs_table([old, new])] == ["new", "old"]
    assert [r["job_id"] for r in views.jobs_table([old, new], limit=1)] == ["new"]


def test_a_finished_jobs_page_has_its_timeline_arguments_dataset_and_report():
    events = finished_job()
    page = views.job_page(fold("job-2026-11-21-0001", events), events)
    assert [(s["stage"], s["state"]) for s in page["timeline"]] == [
        ("validate", "done"), ("train", "done"), ("evaluate", "done"), ("register", "done")]
    assert page["resolved_args"] == events[4].data.resolved_args  # the completed event's
    assert page["dataset"]["rows"] == events[1].data.dataset.rows
    assert page["has_report"] is bool(events[5].data.report_html_uri)
    assert page["ref"] == events[6].data.entry.ref
    assert set(page["evaluation"]) >= {"before", "after", "relative_change", "regressed"}


def test_a_running_jobs_arguments_come_from_its_started_event():
    events = running_job()
    page = views.job_page(fold("job-2026-11-21-0001", events), events)
    assert page["resolved_args"] == events[2].data.resolved_args
    assert page["evaluation"] is None and page["has_report"] is False


def test_the_curve_is_by_step_and_a_resumed_step_keeps_its_latest_point():
    points = views.curve([
        event("training.progress", 3, step=20, train_loss=2.0, learning_rate=1e-4),
        event("training.requested"),
        event("training.progress", 1, step=10, train_loss=3.0),
        event("training.progress", 5, step=20, train_loss=1.5),  # after a resume
    ])
    assert [(p["step"], p["train_loss"]) for p in points] == [(10, 3.0), (20, 1.5)]


def test_a_live_event_carries_a_point_only_for_progress():
    progress = views.live_event(event("training.progress", step=7, train_loss=1.25))
    assert progress["job_id"] == "job-2026-11-21-0001" and progress["point"]["step"] == 7
    assert "point" not in views.live_event(event("adapter.registered"))


def test_adapters_are_grouped_by_name_newest_version_first_with_their_lineage():
    entry = event("adapter.registered").data.entry.model_copy(update={"version": 1, "ref": "x:1"})
    v1, v2 = entry, entry.model_copy(update={"version": 2, "ref": f"{entry.name}:2", "aliases": ["latest"]})
    other = entry.model_copy(update={"name": "another", "ref": "another:1"})
    groups = views.adapters_by_name([v1, other, v2])
    assert [g["name"] for g in groups] == sorted([entry.name, "another"])
    mine = next(g for g in groups if g["name"] == entry.name)
    assert [v["version"] for v in mine["versions"]] == [2, 1]
    assert mine["versions"][0]["aliases"] == ["latest"]
    assert mine["versions"][1]["lineage"] == {
        "job_id": entry.job_id, "base_model": entry.base_model,
        "base_model_revision": entry.base_model_revision, "dataset_uri": entry.dataset_uri,
        "dataset_format": entry.dataset_format, "dataset_rows": entry.dataset_rows, "tags": entry.tags}


def test_downloads_list_each_layouts_files_and_leave_out_a_failed_layout():
    ok = DownloadUrls(ref="a:1", urls={"b.json": "http://s3/b", "a.safetensors": "http://s3/a"},
                      sha256={"a.safetensors": "aa", "b.json": "bb"}, sizes={"a.safetensors": 3})
    links = views.downloads({"mlx": ok, "peft": DownloadUrls(error="no peft layout")})
    assert list(links) == ["mlx"]
    assert [f["file"] for f in links["mlx"]] == ["a.safetensors", "b.json"]
    assert links["mlx"][0] == {"file": "a.safetensors", "url": "http://s3/a", "size": 3, "sha256": "aa"}


def dead(body: bytes, **fields) -> StoredDeadLetter:
    letter = DeadLetter(job_id="j1", service="trainer", original_subject="tunebus.v1.dataset.validated",
                        reason="not an event", body_base64=base64.b64encode(body).decode(), **fields)
    return StoredDeadLetter(42, DeadLetterEvent.wrap(letter, source="tunebus/trainer"))


def test_a_dead_letter_shows_its_json_body_indented_and_what_it_replays():
    detail = views.dead_letter_detail(dead(b'{"a": {"b": 1}}', headers={"Tunebus-Replay-Of": "7"}))
    assert detail["id"] == 42 and detail["replay_of"] == "7"
    assert detail["body"] == json.dumps({"a": {"b": 1}}, indent=2)
    assert detail["body_size"] == len(b'{"a": {"b": 1}}')


def test_a_dead_letter_body_that_is_not_text_is_shown_as_base64():
    detail = views.dead_letter_detail(dead(b"\xff\xfe\x00"))
    assert detail["body"].startswith("(not UTF-8; base64) ") and detail["replay_of"] is None


def test_a_service_row_has_health_and_endpoint_counters():
    row = views.service_row({
        "name": "trainer", "id": "abc", "version": "0.1.0", "healthy": False,
        "problems": ["stalled"], "active_jobs": ["j1"], "metadata": {"backend": "mlx", "restarts": "2"},
        "endpoints": [{"name": "status", "subject": "tunebus.v1.status.trainer", "num_requests": 5,
                       "num_errors": 1, "average_processing_time": 2_000_000}]})
    assert row["healthy"] is False and row["problems"] == ["stalled"]
    assert (row["backend"], row["restarts"], row["active_jobs"]) == ("mlx", "2", ["j1"])
    assert row["endpoints"] == [{"name": "status", "subject": "tunebus.v1.status.trainer",
                                 "requests": 5, "errors": 1, "average_ms": 2.0}]


def test_an_adapter_entry_round_trips_through_its_row():
    entry: AdapterEntry = event("adapter.registered").data.entry
    row = views.adapter_row(entry)
    json.dumps(row)  # what the page receives must be JSON
    assert row["ref"] == entry.ref and row["formats"] == sorted(entry.formats)
