"""Experiment trackers (a request's `integrations`): what W&B (offline), MLflow (a local file
store) and TensorBoard (event files) hold after a run equals the run's progress events, step by
step, on every backend; credentials never come from a request nor land in a tracker's files;
a worker without a tracker's library or settings refuses the request naming the integration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import SecretStr, ValidationError
from tunebus.contracts import TrainingRequested
from tunebus.services.trainer import trackers
from tunebus.services.trainer.backends import capabilities
from tunebus.services.trainer.plan import progress_payload, refusal
from tunebus.services.trainer.trackers import TrackerUnavailable, metrics, offered, open_trackers
from tunebus.shared.delivery import field_errors
from tunebus.shared.settings import MlflowWorkerSettings, TrackerSettings, WandbWorkerSettings

from tests.helpers.backends import NAMES
from tests.helpers.trackers import mlflow_history, tensorboard_history, wandb_offline_run

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
        job.configure(started[0][0])
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
    assert (run["project"], run["name"], run["id"]) == ("tunebus-tests", "run-a", "job-trackers")
    assert run["tags"] == ["tunebus", "facts", "sft", "unit"]
    resolved_args = lora_runs(backend)[0].resolved_args
    assert run["config"]["tunebus"]["tunebus.job_id"] == "job-trackers"
    assert {k: run["config"][k] for k in resolved_args} == resolved_args


def test_the_wandb_key_lands_in_no_file_the_run_writes(logged):
    _, _, root = logged
    for path in (root / "work").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_mlflow_metric_history_equals_the_progress_events(logged):
    events, settings, _ = logged
    run, history = mlflow_history(settings.mlflow.tracking_uri, "tunebus-tests")
    assert history == as_history(events)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-trackers"
    assert run.data.tags["team"] == "qa" and run.data.tags["tunebus.job_id"] == "job-trackers"
    assert run.data.params["optimizer"] == "adamw"


def test_tensorboard_event_files_read_back_as_the_progress_events(logged):
    events, _, root = logged
    history = tensorboard_history(root / "job" / "tensorboard")
    expected = as_history(events)
    assert history.keys() == expected.keys()
    for step, values in expected.items():  # TensorBoard keeps scalars as float32
        assert history[step] == {k: float(np.float32(v)) for k, v in values.items()}, step


def test_a_resumed_job_logs_into_the_same_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    settings = TrackerSettings(mlflow=MlflowWorkerSettings(tracking_uri=(tmp_path / "m").as_uri()))
    asked = request(integrations=[INTEGRATIONS[1]])
    for attempt, (step, outcome) in enumerate([(5, "stopped"), (10, "completed")]):
        job = open_trackers(asked, settings, job_dir=tmp_path / f"job{attempt}", work_dir=tmp_path)
        job.start()
        job.configure({"learning_rate": 1e-4})
        job.log(progress_payload(asked.job_id, _report(step), 10.0))
        job.finish(outcome)
    run, history = mlflow_history(settings.mlflow.tracking_uri, "tunebus-tests")
    assert sorted(history) == [5, 10] and run.info.status == "FINISHED"


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
