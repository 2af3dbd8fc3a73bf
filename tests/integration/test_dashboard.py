"""The dashboard against the running stack, over real HTTP: a tiny job submitted from its submit
endpoints and followed live, its report and downloads, an operator's promote, dead letters, and
what an observer's dashboard refuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.request
import uuid

import pytest

from tests.helpers import web
from tests.helpers.deadletters import envelope_without_specversion, poison
from tunebus.contracts import subjects
from tunebus.shared.dashboard import Dashboard

WORDS = ["tune", "bus", "adapter", "model", "loss", "rank", "alpha", "token", "layer"]
ROWS = "".join(json.dumps({"instruction": f"Spell {w}.", "output": " ".join(w)}) + "\n" for w in WORDS)


@pytest.fixture(scope="module")
def operator_ui(stack):
    with Dashboard(stack.as_role("operator")) as dashboard:
        yield dashboard.url


@pytest.fixture(scope="module")
def observer_ui(stack):
    with Dashboard(stack.as_role("observer")) as dashboard:
        yield dashboard.url


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


def test_the_page_and_its_vendored_chart_library_are_served(operator_ui):
    status, page = web.get(operator_ui, "/")
    assert status == 200 and "/static/vendor/uPlot.iife.min.js" in page
    status, script = web.get(operator_ui, "/static/vendor/uPlot.iife.min.js")
    assert status == 200 and "uPlot" in script


def test_whoami_says_what_the_identity_may_do(operator_ui, observer_ui):
    assert web.get(operator_ui, "/api/whoami")[1] | {"nats": ""} == {
        "user": "operator", "nats": "", "operator": True, "submitter": True}
    observer = web.get(observer_ui, "/api/whoami")[1]
    assert observer["operator"] is False and observer["submitter"] is False
    assert "@" not in observer["nats"]  # no credentials in what the page shows


def test_services_lists_every_service_with_its_replay_endpoint(observer_ui):
    expected = {"dataset-validator", "trainer", "evaluator", "adapter-registry"}
    services = wait_for(lambda: (found := web.get(observer_ui, "/api/services")[1]["services"])
                        and {s["name"] for s in found} >= expected and found,
                        60, "every service answering discovery")
    trainer = next(s for s in services if s["name"] == "trainer")
    assert trainer["healthy"] and {e["name"] for e in trainer["endpoints"]} >= {"status", "replay"}


def test_a_bad_upload_gets_the_validators_errors_with_line_and_field(operator_ui):
    status, up = web.upload(operator_ui, "/api/datasets", "dataset", "bad rows.jsonl",
                            ROWS.encode() + b'{"instruction": "no output"}\n')
    assert status == 200 and up["uri"].endswith("/bad_rows.jsonl"), up
    status, report = web.post(operator_ui, "/api/validate", {"uri": up["uri"], "method": "sft"})
    assert status == 200 and report["valid"] is False
    assert any(e["line"] == len(WORDS) + 1 for e in report["errors"]), report["errors"]


def test_an_observer_may_not_submit_or_promote(observer_ui):
    # (Uploads are S3's to refuse: the embedded stack's S3 endpoint checks no keys, see
    # tests/integration/test_s3_policies.py for the policies themselves.)
    status, answer = web.post(observer_ui, "/api/jobs", {
        "adapter_name": "nope", "base_model": "s3://tunebus-models/tiny-llama",
        "dataset_uri": "s3://tunebus-datasets/uploads/x/y.jsonl"})
    assert status == 403 and "observer may not publish to tunebus.v1.training.requested" in answer["error"]
    status, answer = web.post(observer_ui, "/api/adapters/promote", {"ref": "nope:1"})
    assert status == 403 and "registry.promote" in answer["error"]


def test_a_job_submitted_from_the_dashboard_is_followed_live_to_its_report_and_promoted(
        operator_ui, observer_ui, tiny_model_uri, stack):
    adapter = f"ui-{uuid.uuid4().hex[:6]}"
    status, up = web.upload(operator_ui, "/api/datasets", "dataset", "spell.jsonl", ROWS.encode())
    assert status == 200, up
    assert web.post(operator_ui, "/api/validate", {"uri": up["uri"], "method": "sft"})[1]["valid"]
    with web.LiveEvents(observer_ui) as live:
        # A learning rate this small leaves the loss where it was: the registry does not
        # promote the version by itself, so the promotion below is the operator's.
        status, submitted = web.post(operator_ui, "/api/jobs", {
            "job_id": up["job_id"], "adapter_name": adapter, "base_model": tiny_model_uri,
            "dataset_uri": up["uri"], "iters": 4, "learning_rate": 1e-7, "batch_size": 2,
            "max_seq_length": 64, "rank": 4})
        assert status == 200, submitted
        job_id = submitted["job_id"]
        progress = live.wait_for(job_id, "tunebus.training.progress.v1")
        assert progress["point"]["total_steps"] == 4
        live.wait_for(job_id, "tunebus.adapter.registered.v1", timeout=180)

    rows = web.get(observer_ui, "/api/jobs")[1]["jobs"]
    row = next(r for r in rows if r["job_id"] == job_id)
    assert row["phase"] == "done" and row["ref"] == f"{adapter}:1"
    page = web.get(observer_ui, f"/api/jobs/{job_id}")[1]
    assert [s["state"] for s in page["timeline"]] == ["done"] * 4
    assert page["resolved_args"] and page["dataset"]["rows"] == len(WORDS) and page["has_report"]
    points = web.get(observer_ui, f"/api/jobs/{job_id}/curve")[1]["points"]
    assert [p["step"] for p in points][-1] == 4
    status, report = web.get(observer_ui, f"/api/jobs/{job_id}/report")
    assert status == 200 and "Evaluation of" in report

    version = web.get(observer_ui, f"/api/adapters/{adapter}:1")[1]
    assert "production" not in version["aliases"]
    assert set(version["downloads"]) == {"mlx", "peft", "gguf"}  # the registry adds the GGUF copy
    link = next(f for f in version["downloads"]["peft"] if f["file"] == "adapter_model.safetensors")
    with urllib.request.urlopen(link["url"], timeout=30) as response:
        assert hashlib.sha256(response.read()).hexdigest() == link["sha256"]

    status, moved = web.post(operator_ui, "/api/adapters/promote", {"ref": f"{adapter}:1", "reason": "ui"})
    assert status == 200 and moved["alias"] == "production" and moved["version"] == 1, moved
    assert "production" in web.get(observer_ui, f"/api/adapters/{adapter}:1")[1]["aliases"]
    names = {a["name"] for a in web.get(observer_ui, "/api/adapters")[1]["adapters"]}
    assert adapter in names


def test_dead_letters_are_listed_filtered_shown_and_replayed_by_the_operator_only(
        stack, operator_ui, observer_ui):
    job_id = f"ui-dlq-{uuid.uuid4().hex[:6]}"
    body = envelope_without_specversion(job_id, "tunebus.training.requested.v1")
    dead = asyncio.run(poison(stack.as_role("submitter"), subjects.TRAINING_REQUESTED, body, job_id))
    listed = web.get(observer_ui, f"/api/deadletters?service=dataset-validator&reason=specversion&job={job_id}")[1]
    assert [d["id"] for d in listed["dead_letters"]] == [dead.sequence]
    assert web.get(observer_ui, f"/api/deadletters?service=trainer&job={job_id}")[1]["dead_letters"] == []
    detail = web.get(observer_ui, f"/api/deadletters/{dead.sequence}")[1]
    assert detail["original_subject"] == subjects.TRAINING_REQUESTED and job_id in detail["body"]
    assert web.get(observer_ui, "/api/deadletters/999999")[0] == 404

    status, refused = web.post(observer_ui, f"/api/deadletters/{dead.sequence}/replay")
    assert status == 403 and "refused" in refused["error"]
    status, replayed = web.post(operator_ui, f"/api/deadletters/{dead.sequence}/replay", {"reason": "ui"})
    assert status == 200 and replayed["subject"] == subjects.TRAINING_REQUESTED, replayed
    wait_for(lambda: [d for d in web.get(observer_ui, f"/api/deadletters?job={job_id}")[1]["dead_letters"]
                      if d["replay_of"] == str(dead.sequence)], 30, "the replay's own dead letter")
