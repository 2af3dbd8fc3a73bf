"""`tunebus status`, `tunebus jobs list` and `tunebus health` against the running stack: a job's
status is rebuilt from its events on the bus, the services answer discovery."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env

ROWS = [{"instruction": f"Spell {w}.", "output": " ".join(w)} for w in
        ["tune", "bus", "adapter", "model", "loss", "rank", "alpha", "token", "layer", "event"]]


@pytest.fixture(scope="module")
def cli(stack):
    env = service_env(stack.settings) | {"COLUMNS": "200"}
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_job(cli, tmp_path_factory, tiny_model_uri) -> str:
    data = tmp_path_factory.mktemp("status") / "spell.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    job_id = f"status-{uuid.uuid4().hex[:8]}"
    result = cli("submit", str(data), "--adapter", "status-speller", "--base-model", tiny_model_uri,
                 "--job-id", job_id, "--iters", "10", "--learning-rate", "0.005", "--rank", "4",
                 "--max-seq-length", "64", "--watch")
    assert result.exit_code == 0, result.output
    return job_id


@pytest.fixture(scope="module")
def rejected_job(cli, tmp_path_factory, tiny_model_uri) -> str:
    bad = tmp_path_factory.mktemp("rejected") / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    job_id = f"status-bad-{uuid.uuid4().hex[:8]}"
    result = cli("submit", str(bad), "--adapter", "status-broken", "--base-model", tiny_model_uri,
                 "--job-id", job_id, "--watch")
    assert result.exit_code == 1
    return job_id


def test_status_of_a_finished_job_shows_every_stage_and_what_it_did(cli, finished_job):
    result = cli("status", finished_job, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["state"] == "done" and status["adapter_name"] == "status-speller"
    assert {name: s["state"] for name, s in status["stages"].items()} == {
        "validate": "done", "train": "done", "evaluate": "done", "register": "done"}
    for stage in status["stages"].values():
        assert stage["seconds"] is not None and stage["seconds"] >= 0 and stage["error"] is None
    assert (status["step"], status["total_steps"]) == (10, 10)
    assert status["train_loss"] > 0 and status["tokens_per_second"] > 0
    assert status["lora"]["rank"] == 4 and status["hyperparameters"]["learning_rate"] == 0.005
    assert status["dataset"]["rows"] == len(ROWS) and status["dataset"]["format"] == "alpaca"
    assert status["ref"].startswith("status-speller:")
    assert status["evaluation"]["report_html_uri"].endswith("/evaluation.html")

    readable = cli("status", finished_job)
    assert readable.exit_code == 0
    for text in ("validate", "train", "evaluate", "register", "step 10/10", "rank 4", "10 rows"):
        assert text in readable.output


def test_status_of_a_rejected_job_names_the_stage_and_the_error(cli, rejected_job):
    result = cli("status", rejected_job, "--json")
    assert result.exit_code == 1
    status = json.loads(result.output)
    assert status["state"] == "failed (validate)"
    assert status["stages"]["validate"]["state"] == "failed"
    assert "line 2" in status["stages"]["validate"]["error"] or ":2 " in status["stages"]["validate"]["error"]
    assert status["stages"]["train"]["state"] == "pending"


def test_status_of_an_unknown_job_is_a_clear_error(cli):
    result = cli("status", "never-submitted-job")
    assert result.exit_code == 1 and "no events of job never-submitted-job" in result.output


def test_jobs_list_shows_each_job_once_with_its_state(cli, finished_job, rejected_job):
    result = cli("jobs", "list", "--json", "--limit", "1000")
    assert result.exit_code == 0
    jobs = {j["job_id"]: j for j in json.loads(result.output)["jobs"]}
    assert jobs[finished_job]["state"] == "done" and jobs[rejected_job]["state"] == "failed (validate)"
    table = cli("jobs", "list")
    assert table.exit_code == 0 and finished_job in table.output and "status-speller" in table.output


def test_health_lists_every_service_with_version_backend_and_capabilities(cli):
    result = cli("health", "--json")
    assert result.exit_code == 0, result.output
    health = json.loads(result.output)
    by_name = {i["name"]: i for i in health["instances"]}
    assert set(by_name) >= {"dataset-validator", "trainer", "evaluator", "adapter-registry"}
    assert health["missing"] == []
    assert by_name["evaluator"]["metadata"]["backend"] == "mlx"
    assert "probe_rouge_l" in json.loads(by_name["evaluator"]["metadata"]["capabilities"])["metrics"]
    assert "tunebus.v1.registry.promote" in json.loads(
        by_name["adapter-registry"]["metadata"]["capabilities"])["api"]
    assert all(i["version"] and isinstance(i["active_jobs"], list) for i in by_name.values())
