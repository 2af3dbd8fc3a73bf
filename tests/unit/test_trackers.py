"""Experiment trackers (a request's `integrations`): what W&B (offline), MLflow (a local file
store) and TensorBoard (event files) hold after a run equals the run's progress events, step by
step, on every backend; credentials never come from a request nor land in a tracker's files;
a worker without a tracker's library or settings refuses the request naming the integration."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
import structlog
from pydantic import SecretStr, ValidationError
from tunebus.contracts import TrainingRequested
from tunebus.services.trainer import trackers
from tunebus.services.trainer.backends import capabilities
from tunebus.services.trainer.plan import progress_payload, refusal
from tunebus.services.trainer.trackers import (
    Trackers,
    TrackerUnavailable,
    metrics,
    offered,
    open_trackers,
    wandb_run_id,
)
from tunebus.shared.delivery import field_errors
from tunebus.shared.settings import MlflowWorkerSettings, TrackerSettings, WandbWorkerSettings

from tests.helpers.backends import NAMES
from tests.helpers.trackers import mlflow_history, tensorboard_history, wandb_offline_run

# What a backend's resolved args say about the worker's own disk, which no tracker may see.
WORKER_PATHS = {"model": "/srv/worker/models/tiny", "data": "/srv/worker/jobs/j/data",
                "adapter_path": "/srv/worker/jobs/j/adapter"}
# Offline mode needs no key; this one stands for a real key, which must appear nowhere.
KEY = "wandb-key-that-must-not-leak-0123456789"
INTEGRATIONS = [
    {"type": "wandb", "wandb": {"project": "tunebus-tests", "name": "run-a", "tags": ["unit"]}},
    {"type": "mlflow", "mlflow": {"experiment": "tunebus-tests", "tags": {"team": "qa"}}},
    {"type": "tensorboard"},
]


def request(job_id: str = "job-trackers", **fields) -> TrainingRequested:
    return TrainingRequested(job_id=job_id, adapter_name="facts", base_model="tiny",
                             dataset={"uri": "s3://datasets/facts.jsonl"}, **fields)


@pytest.fixture(scope="module", params=NAMES)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def logged(backend, lora_runs, tmp_path_factory):
    """(progress events, tracker settings, work dir, job dir) after a backend's 30-step run had
    its progress events handed to all three trackers, as the runner hands them."""
    result, reports, started = lora_runs(backend)
    root = tmp_path_factory.mktemp(f"trackers-{backend}")
    settings = TrackerSettings(
        wandb=WandbWorkerSettings(mode="offline", api_key=SecretStr(KEY)),
        mlflow=MlflowWorkerSettings(tracking_uri=(root / "mlruns").as_uri()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores for tests
        patch.setenv("WANDB_SILENT", "true")
        job = open_trackers(request(integrations=INTEGRATIONS), settings,
                            job_dir=root / "job", work_dir=root / "work")
        job.start()
        job.configure(started[0][0] | WORKER_PATHS)
        events = [progress_payload("job-trackers", report, iters_per_epoch=10.0)
                  for report in reports]
        for event in events:
            job.log(event)
        job.finish("completed")
    return events, settings, root


def as_history(events) -> dict[int, dict[str, float]]:
    return {event.step: metrics(event) for event in events}


def test_wandb_history_equals_the_progress_events(logged):
    events, _, root = logged
    run, history = wandb_offline_run(root / "work" / "wandb")
    assert history == as_history(events)
    assert {"train_loss", "learning_rate", "trained_tokens"} <= history[events[-1].step].keys()
    assert any("val_loss" in step for step in history.values())


def test_wandb_run_is_named_and_tagged_as_asked_with_the_resolved_args(logged, lora_runs, backend):
    _, _, root = logged
    run, _ = wandb_offline_run(root / "work" / "wandb")
    assert (run["project"], run["name"]) == ("tunebus-tests", "run-a")
    assert run["id"] == wandb_run_id("job-trackers") != "job-trackers"
    assert run["tags"] == ["tunebus", "facts", "sft", "unit"]
    shipped = lora_runs(backend)[0].resolved_args | {"model": "tiny"}
    for key in ("data", "adapter_path"):
        shipped.pop(key, None)
    assert run["config"]["tunebus"]["tunebus.job_id"] == "job-trackers"
    assert {k: run["config"][k] for k in shipped} == shipped
    assert "/srv/worker" not in json.dumps(run["config"])


def test_the_wandb_key_lands_in_no_file_the_run_writes(logged):
    _, _, root = logged
    for path in (root / "work").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_mlflow_metric_history_equals_the_progress_events(logged):
    events, settings, _ = logged
    run, history = mlflow_history(settings.mlflow.tracking_uri.get_secret_value(), "tunebus-tests")
    assert history == as_history(events)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-trackers"
    assert run.data.tags["team"] == "qa" and run.data.tags["tunebus.job_id"] == "job-trackers"
    assert run.data.params["optimizer"] == "adamw" and run.data.params["model"] == "tiny"
    assert not any("/srv/worker" in value for value in run.data.params.values())


def test_tensorboard_event_files_read_back_as_the_progress_events(logged):
    events, _, root = logged
    history = tensorboard_history(root / "job" / "tensorboard")
    expected = as_history(events)
    assert history.keys() == expected.keys()
    for step, values in expected.items():  # TensorBoard keeps scalars as float32
        assert history[step] == {k: float(np.float32(v)) for k, v in values.items()}, step


def test_a_resumed_job_logs_into_the_same_mlflow_run(tmp_path, monkeypatch):
    """Attempt 1 opens the run and ends before training starts (no params yet); the retry
    logs them into that run."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    settings = TrackerSettings(mlflow=MlflowWorkerSettings(tracking_uri=(tmp_path / "m").as_uri()))
    asked = request(integrations=[INTEGRATIONS[1]])
    for attempt, (step, outcome) in enumerate([(None, "failed"), (5, "stopped"),
                                               (10, "completed")]):
        job = open_trackers(asked, settings, job_dir=tmp_path / f"job{attempt}", work_dir=tmp_path)
        job.start()
        if step is not None:
            job.configure({"learning_rate": 1e-4})
            job.log(progress_payload(asked.job_id, _report(step), 10.0))
        job.finish(outcome)
    run, history = mlflow_history(settings.mlflow.tracking_uri.get_secret_value(), "tunebus-tests")
    assert sorted(history) == [5, 10] and run.info.status == "FINISHED"
    assert run.data.params == {"learning_rate": "0.0001", "model": "tiny"}


def _report(step: int, loss: float | None = None):
    from tunebus.services.trainer.backend import ProgressReport

    return ProgressReport(step=step, total_steps=10, train_loss=loss or 1.0 / step, val_loss=None,
                          learning_rate=1e-4, tokens_per_second=None, trained_tokens=step * 8,
                          peak_memory_gb=None)


def test_a_tracker_that_cannot_open_its_run_says_which_and_why(tmp_path):
    settings = TrackerSettings(mlflow=MlflowWorkerSettings(tracking_uri="nosuchscheme://x"))
    job = open_trackers(request(integrations=[INTEGRATIONS[2], INTEGRATIONS[1]]), settings,
                        job_dir=tmp_path, work_dir=tmp_path)
    with pytest.raises(TrackerUnavailable, match=r"^integration mlflow: could not start its run"):
        job.start()
    assert job.started == []  # the TensorBoard writer it had opened is closed again


# -- the request carries no credentials


@pytest.mark.parametrize("integration", [
    {"type": "wandb", "wandb": {"project": "p", "api_key": KEY}},
    {"type": "wandb", "wandb": {"project": "p", "WANDB_API_KEY": KEY}},
    {"type": "mlflow", "mlflow": {"experiment": "e", "token": KEY}},
    {"type": "mlflow", "mlflow": {"experiment": "e", "password": KEY}},
    {"type": "tensorboard", "tensorboard": {"secret": KEY}},
])
def test_a_request_carrying_a_credential_is_rejected_without_echoing_it(integration):
    with pytest.raises(ValidationError) as error:
        request(integrations=[integration])
    (problem,) = field_errors(error.value)
    assert "a request carries no credentials" in problem and KEY not in problem
    assert problem.startswith(f"integrations.0.{integration['type']}")


@pytest.mark.parametrize("integration, where", [
    ({"type": "wandb", "wandb": {"projcet": "p"}}, "integrations.0.wandb.wandb.project"),
    ({"type": "mlflow", "mlflow": {"experiment": "e", "tracking_uri": "http://x"}},
     "integrations.0.mlflow.mlflow.tracking_uri"),
    ({"type": "comet"}, "integrations.0"),
])
def test_a_misspelt_or_unknown_tracker_setting_is_an_error_naming_the_field(integration, where):
    with pytest.raises(ValidationError) as error:
        request(integrations=[integration])
    assert any(p.startswith(where) for p in field_errors(error.value)), field_errors(error.value)


def test_each_tracker_is_named_once():
    with pytest.raises(ValidationError, match="each tracker at most once"):
        request(integrations=[INTEGRATIONS[2], INTEGRATIONS[2]])


# -- what a worker offers


def test_a_worker_without_the_library_refuses_naming_the_integration(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    caps = offered(capabilities("mlx"), TrackerSettings(wandb=WandbWorkerSettings(mode="offline")))
    assert "wandb" not in caps.integrations and "tensorboard" in caps.integrations
    reason = refusal(request(integrations=[INTEGRATIONS[0]]), caps)
    assert reason == ("integration 'wandb' is not offered by the mlx worker: the wandb package is "
                      "not installed on this worker (pip install 'tunebus[trackers]')")


def test_a_worker_without_a_key_or_tracking_uri_refuses_and_says_which_setting():
    caps = offered(capabilities("mlx"), TrackerSettings())
    assert caps.integrations == ["tensorboard"]
    assert "TUNEBUS_TRAINER__TRACKERS__WANDB__API_KEY" in refusal(
        request(integrations=[INTEGRATIONS[0]]), caps)
    assert "TUNEBUS_TRAINER__TRACKERS__MLFLOW__TRACKING_URI" in refusal(
        request(integrations=[INTEGRATIONS[1]]), caps)
    assert refusal(request(integrations=[INTEGRATIONS[2]]), caps) is None


def test_a_worker_with_a_key_offers_wandb_and_announces_no_key():
    caps = offered(capabilities("mlx"), TrackerSettings(
        wandb=WandbWorkerSettings(api_key=SecretStr(KEY)),
        mlflow=MlflowWorkerSettings(tracking_uri="http://mlflow:5000")))
    assert caps.integrations == ["mlflow", "tensorboard", "wandb"]
    assert KEY not in caps.model_dump_json() and refusal(
        request(integrations=INTEGRATIONS), caps) is None


def test_an_older_worker_offers_no_integration():
    caps = capabilities("mlx").model_validate(
        json.loads(capabilities("mlx").model_dump_json(exclude={"integrations"})))
    assert "is not offered" in refusal(request(integrations=[INTEGRATIONS[2]]), caps)


def test_the_committed_schema_takes_integrations_and_refuses_a_key_in_them():
    import jsonschema
    from tunebus.contracts import export

    path = export.HERE / "schemas" / "tunebus.training.requested.v1.json"
    schema = json.loads(path.read_text())
    payload = {"$ref": "#/$defs/TrainingRequested", "$defs": schema["$defs"]}
    data = json.loads(request(integrations=INTEGRATIONS).model_dump_json())
    jsonschema.validate(data, payload)
    data["integrations"][0]["wandb"]["api_key"] = KEY
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, payload)


def test_tensorboard_files_of_a_resumed_job_read_as_one_run(tmp_path):
    """The runner keeps event files with each checkpoint and fetches them back on resume; the
    resumed writer's steps restart after the checkpoint (step 4), and the reader drops what the
    first attempt logged past it."""
    asked = request(integrations=[INTEGRATIONS[2]])
    for attempt, steps in ((1, [2, 4, 6, 8]), (2, [6, 8, 10])):
        job = open_trackers(asked, TrackerSettings(), job_dir=tmp_path, work_dir=tmp_path)
        job.start()
        for step in steps:
            job.log(progress_payload(asked.job_id, _report(step, loss=attempt + step / 100), 10.0))
        job.finish("stopped" if attempt == 1 else "completed")
    history = tensorboard_history(tmp_path / "tensorboard")
    assert {step: round(v["train_loss"], 4) for step, v in history.items()} == {
        2: 1.02, 4: 1.04, 6: 2.06, 8: 2.08, 10: 2.1}


# -- a tracker never holds the job up, nor shows a secret


class Recording:
    """A tracker that records its calls; `block` holds its log calls, `fail_at` raises at the
    n-th one (with a URL holding credentials in the error, as MLflow's errors quote it)."""

    def __init__(self, name: str, block: threading.Event | None = None, fail_at: int = 0):
        self.name, self.block, self.fail_at = name, block, fail_at
        self.calls: list[tuple[str, object]] = []

    def start(self):
        self.calls.append(("start", None))

    def configure(self, resolved_args):
        self.calls.append(("configure", resolved_args))

    def log(self, progress):
        self.calls.append(("log", progress.step))
        if self.block is not None:
            self.block.wait()
        if len([c for c in self.calls if c[0] == "log"]) == self.fail_at:
            raise ConnectionError("POST https://alice:hunter2@mlflow.example/api failed")

    def finish(self, outcome):
        self.calls.append(("finish", outcome))


def _feed(job: Trackers, steps: int) -> bool:
    """Whether configure, `steps` logs and finish returned (in a thread, waited for 10 s)."""
    def feed():
        job.configure({"learning_rate": 1e-4} | WORKER_PATHS)
        for step in range(1, steps + 1):
            job.log(progress_payload("job-trackers", _report(step), 10.0))
        job.finish("completed")

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    thread.join(10)
    return not thread.is_alive()


def test_a_tracker_that_blocks_holds_back_neither_the_logging_nor_the_end(monkeypatch):
    monkeypatch.setattr(trackers, "QUEUE_SIZE", 50)
    stuck = threading.Event()
    blocked = Recording("mlflow", block=stuck)
    job = Trackers([blocked], request=request(), finish_timeout_s=0.2)
    job.start()
    with structlog.testing.capture_logs() as logs:
        assert _feed(job, 500)  # every call returned while the tracker's first log hangs
    stuck.set()
    assert job.dropped >= 500 - 50 - 1  # the oldest metrics went first, the queue stayed bounded
    events = [entry["event"] for entry in logs]
    assert "trackers did not finish in time; left behind" in events
    assert "trackers fell behind; metrics dropped" in events


def test_a_tracker_failing_mid_run_is_dropped_the_others_go_on_and_no_secret_is_logged():
    failing, fine = Recording("mlflow", fail_at=3), Recording("tensorboard")
    job = Trackers([failing, fine], request=request(), secrets=("hunter2",))
    job.start()
    with structlog.testing.capture_logs() as logs:
        assert _feed(job, 10)
    assert [c for c in failing.calls if c[0] != "configure"] == [
        ("start", None), ("log", 1), ("log", 2), ("log", 3)]  # nothing after its failure
    assert fine.calls[-1] == ("finish", "completed") and len(fine.calls) == 1 + 1 + 10 + 1
    (warning,) = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["tracker"] == "mlflow" and "hunter2" not in json.dumps(warning)
    assert "alice" not in warning["error"] and "mlflow.example/api" in warning["error"]


def test_the_trackers_get_the_args_without_the_workers_paths():
    recording = Recording("tensorboard")
    job = Trackers([recording], request=request(base_model_revision="abc123"))
    job.start()
    assert _feed(job, 1)
    (configured,) = [args for call, args in recording.calls if call == "configure"]
    assert configured == {"learning_rate": 1e-4, "model": "tiny", "base_model_revision": "abc123"}


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (an MLflow server that hangs)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_an_mlflow_server_that_hangs_fails_the_start_soon_without_its_credentials(
        silent_server, tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(name, "")  # restored after the test: the tracker sets them
    uri = f"http://alice:hunter2@127.0.0.1:{silent_server}"
    settings = TrackerSettings(mlflow=MlflowWorkerSettings(
        tracking_uri=uri, request_timeout_s=1, max_retries=0))
    assert "hunter2" not in repr(settings)
    job = open_trackers(request(integrations=[INTEGRATIONS[1]]), settings,
                        job_dir=tmp_path, work_dir=tmp_path)
    with pytest.raises(TrackerUnavailable) as error:
        job.start()  # one 1 s timeout, no retry (MLflow's defaults: minutes)
    reason = str(error.value)
    assert reason.startswith("integration mlflow: could not start its run")
    assert "hunter2" not in reason and "alice" not in reason and error.value.__cause__ is None


@pytest.mark.parametrize("integration, settings, why", [
    ({"type": "wandb", "wandb": {"project": "theirs"}},
     TrackerSettings(wandb=WandbWorkerSettings(mode="offline", projects=["ours"])),
     "integration wandb: could not start its run: PermissionError: project 'theirs' is not one "
     "this worker logs to (allowed: ours)"),
    ({"type": "wandb", "wandb": {"project": "ours", "entity": "someone-else"}},
     TrackerSettings(wandb=WandbWorkerSettings(mode="offline", entities=["team"])),
     "entity 'someone-else' is not one this worker logs to (allowed: team)"),
    ({"type": "mlflow", "mlflow": {"experiment": "theirs"}},
     TrackerSettings(mlflow=MlflowWorkerSettings(tracking_uri="http://mlflow:5000",
                                                 experiments=["ours", "shared"])),
     "experiment 'theirs' is not one this worker logs to (allowed: ours, shared)"),
])
def test_a_tracker_target_outside_the_workers_allowlist_is_refused_naming_it(
        integration, settings, why, tmp_path):
    job = open_trackers(request(integrations=[integration]), settings,
                        job_dir=tmp_path, work_dir=tmp_path)
    with pytest.raises(TrackerUnavailable) as error:
        job.start()
    assert why in str(error.value) and job.started == []


def test_the_wandb_run_id_is_the_jobs_own_and_stable():
    assert wandb_run_id("job-1") == wandb_run_id("job-1") != wandb_run_id("job-2")
    assert len(wandb_run_id("job-1")) == 32 and wandb_run_id("job-1").isalnum()
