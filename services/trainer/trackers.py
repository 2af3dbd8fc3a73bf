"""Experiment trackers: a request's `integrations` (W&B, MLflow, TensorBoard) receive what its
progress events say.

Both backends turn what their library reports into one stream of ProgressReports, each in its
library's callback (mlx-lm's `TrainingCallback`, the Hugging Face Trainer's `TrainerCallback`);
the runner makes every report a progress event and hands that same event to each tracker here.
So a tracker's step, loss, learning rate and validation loss are the bus's, on either backend,
also when several processes train (rank 0 alone reports). The Trainer's own `report_to` is not
used: it counts optimizer updates, not batches, and logs the rate of the update to come.

`metrics` decides what goes out; the clients are the libraries' own (wandb, MLflow's
`MlflowClient`, `tensorboard.summary.Writer`, which needs no torch or TensorFlow). Each library
is an optional extra (`tunebus[trackers]`); a worker without it, or without the setting it
needs (a W&B key, an MLflow tracking URI), does not offer that integration, and a request that
names it is refused with the reason (`offered`, then `plan.refusal`). Credentials are the
worker's settings only: a request cannot carry one (contracts/training.py), and none is logged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from tunebus.contracts import TrainingProgress, TrainingRequested
from tunebus.contracts.training import (
    Integration,
    MlflowIntegration,
    TensorBoardIntegration,
    TrainerCapabilities,
    WandbIntegration,
)
from tunebus.shared.adapter_layouts import TENSORBOARD_DIR
from tunebus.shared.settings import TrackerSettings

from .artifacts import without_worker_paths

log = structlog.get_logger()

Outcome = Literal["completed", "failed", "stopped"]
# The import name of each tracker's library (installed with `tunebus[trackers]`).
LIBRARIES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
# A progress event's figures that are measurements (not counters of the plan, not forecasts).
MEASURED = ("epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_second",
            "steady_tokens_per_second", "trained_tokens", "peak_memory_gb", "reward",
            "elapsed_seconds")
METRICS_PREFIX = "metrics/"  # method-specific figures (TrainingProgress.metrics), by their name


def metrics(progress: TrainingProgress) -> dict[str, float]:
    """What every tracker logs for one progress event, at its `step`: each measured field that
    the event has, under its field name, and `metrics/<name>` for its method-specific figures."""
    logged = {name: float(value) for name in MEASURED
              if (value := getattr(progress, name)) is not None}
    logged |= {METRICS_PREFIX + name: float(value) for name, value in progress.metrics.items()}
    return {name: value for name, value in logged.items() if math.isfinite(value)}


def refusals(settings: TrackerSettings) -> dict[str, str]:
    """{integration type: why this worker cannot log to it} for those it cannot."""
    why = {}
    for kind, library in LIBRARIES.items():
        if importlib.util.find_spec(library) is None:
            why[kind] = (f"the {library} package is not installed on this worker "
                         "(pip install 'tunebus[trackers]')")
    if "wandb" not in why and settings.wandb.api_key is None and settings.wandb.mode != "offline":
        why["wandb"] = ("this worker has no W&B API key "
                        "(TUNEBUS_TRAINER__TRACKERS__WANDB__API_KEY, or __MODE=offline)")
    if "mlflow" not in why and settings.mlflow.tracking_uri is None:
        why["mlflow"] = ("this worker has no MLflow tracking URI "
                         "(TUNEBUS_TRAINER__TRACKERS__MLFLOW__TRACKING_URI)")
    return why


def offered(capabilities: TrainerCapabilities, settings: TrackerSettings) -> TrainerCapabilities:
    """`capabilities` with the integrations this worker offers, and why not the others."""
    why = refusals(settings)
    return capabilities.model_copy(update={
        "integrations": sorted(set(LIBRARIES) - set(why)),
        "why_not": capabilities.why_not | {f"integration={k}": v for k, v in why.items()},
    })


class Tracker(Protocol):
    name: str

    def start(self) -> None:
        """Open the run (before training starts)."""

    def configure(self, resolved_args: dict[str, Any]) -> None:
        """Record the run's effective settings (training.started's resolved_args)."""

    def log(self, progress: TrainingProgress) -> None:
        """Log `metrics(progress)` at `progress.step`."""

    def finish(self, outcome: Outcome) -> None:
        """Close the run, marked with how the training ended."""


# What a tracker may hold back: calls waiting for its thread (the oldest metrics go first when
# it falls this far behind), and how long finishing its runs may take once training has ended.
QUEUE_SIZE = 1000
_CLOSE = object()


@dataclass
class Trackers:
    """The trackers of one job. `start` raises TrackerUnavailable when one cannot open its run
    (the job fails with that reason, before training). After that they never hold the job up:
    `configure` and `log` queue the call for one thread of theirs and return (when the trackers
    fall QUEUE_SIZE calls behind, the oldest metrics are dropped and counted), a tracker whose
    call fails is dropped for the rest of the job (logged once; training goes on: a tracker
    observes a run, it does not decide it), and `finish` waits at most `finish_timeout_s`."""

    trackers: list[Tracker]
    tensorboard_dir: Path | None = None  # its event files, to be stored with the adapter
    request: TrainingRequested | None = None  # whose base model the args name instead of a path
    secrets: tuple[str, ...] = ()  # what error text must not show (a tracking URI, say)
    finish_timeout_s: float = 30.0
    started: list[Tracker] = field(default_factory=list)
    dropped: int = 0  # metrics calls dropped because the trackers fell behind
    _queue: deque = field(default_factory=deque, init=False, repr=False)
    _ready: threading.Condition = field(default_factory=threading.Condition, init=False,
                                        repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.start()
            except Exception as e:
                self._close_now("failed")
                raise TrackerUnavailable(self.scrub(
                    f"integration {tracker.name}: could not start its run: "
                    f"{type(e).__name__}: {e}")) from None
            self.started.append(tracker)
        if self.started:
            self._thread = threading.Thread(target=self._work, name="trainer-trackers",
                                            daemon=True)  # one stuck in a call ends with us
            self._thread.start()

    def configure(self, resolved_args: dict[str, Any]) -> None:
        """Record the run's settings, as they ship with the adapter (no path of the worker)."""
        if self.request is not None:
            resolved_args = without_worker_paths(resolved_args, self.request.base_model,
                                                 self.request.base_model_revision)
        self._put("configure", resolved_args)

    def log(self, progress: TrainingProgress) -> None:
        self._put("log", progress)

    def finish(self, outcome: Outcome) -> None:
        """Close the runs after what was queued, waiting at most `finish_timeout_s`."""
        thread = self._thread
        if thread is None:
            return
        self._put("finish", outcome)
        self._put(_CLOSE, None)
        thread.join(self.finish_timeout_s)
        if thread.is_alive():
            log.warning("trackers did not finish in time; left behind",
                        trackers=[t.name for t in self.started], timeout_s=self.finish_timeout_s)
        if self.dropped:
            log.warning("trackers fell behind; metrics dropped", dropped=self.dropped)
        self._thread = None

    def scrub(self, text: str) -> str:
        """`text` without the worker's secrets nor any URL's user:password part."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "<redacted>")
        return _USERINFO.sub(r"\1<redacted>@", text)

    def _put(self, call: object, argument: Any) -> None:
        if self._thread is None:
            return
        with self._ready:
            if len(self._queue) >= QUEUE_SIZE:
                oldest = next((i for i, (c, _) in enumerate(self._queue) if c == "log"), None)
                if oldest is not None:
                    del self._queue[oldest]
                    self.dropped += 1
            self._queue.append((call, argument))
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                call, argument = self._queue.popleft()
            if call is _CLOSE:
                return
            self._each(call, argument)
            if call == "finish":
                self.started = []

    def _close_now(self, outcome: Outcome) -> None:
        self._each("finish", outcome)
        self.started = []

    def _each(self, call: str, argument: Any) -> None:
        for tracker in list(self.started):
            try:
                getattr(tracker, call)(argument)
            except Exception as e:
                self.started.remove(tracker)  # one that failed once is left alone for this job
                log.warning("tracker call failed; no more calls to it in this job",
                            tracker=tracker.name, call=call,
                            error=self.scrub(f"{type(e).__name__}: {e}"))


# scheme://user:password@ (or scheme://token@) in a URL, as an error may quote it.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


class TrackerUnavailable(Exception):
    pass


def open_trackers(request: TrainingRequested, settings: TrackerSettings, *, job_dir: Path,
                  work_dir: Path) -> Trackers:
    """The trackers `request.integrations` names (none started yet). TensorBoard writes under
    `job_dir`, W&B (offline runs, for `wandb sync`) under its `dir` setting or `work_dir`."""
    trackers = [_tracker(integration, request, settings, job_dir=job_dir, work_dir=work_dir)
                for integration in request.integrations]
    tensorboard = [t.directory for t in trackers if isinstance(t, TensorBoardTracker)]
    uri = settings.mlflow.tracking_uri
    return Trackers(trackers, tensorboard[0] if tensorboard else None, request,
                    secrets=(uri.get_secret_value(),) if uri is not None else (),
                    finish_timeout_s=settings.finish_timeout_s)


def _tracker(integration: Integration, request: TrainingRequested, settings: TrackerSettings, *,
             job_dir: Path, work_dir: Path) -> Tracker:
    if isinstance(integration, WandbIntegration):
        directory = settings.wandb.dir or work_dir / "wandb"
        return WandbTracker(integration, request, settings, directory)
    if isinstance(integration, MlflowIntegration):
        return MlflowTracker(integration, request, settings)
    assert isinstance(integration, TensorBoardIntegration)
    return TensorBoardTracker(job_dir / TENSORBOARD_DIR)


def _tags(request: TrainingRequested) -> dict[str, str]:
    return {"tunebus.job_id": request.job_id, "tunebus.adapter_name": request.adapter_name,
            "tunebus.method": request.method, "tunebus.base_model": request.base_model}


def wandb_run_id(job_id: str) -> str:
    """The W&B run id of a job: derived from it, so a job resumed after a restart goes on logging
    into the same run, and no request can name (and append to) a run that tunebus did not create
    for that job."""
    return hashlib.sha256(f"tunebus/{job_id}".encode()).hexdigest()[:32]


def _not_allowed(what: str, value: str | None, allowed: list[str] | None) -> str | None:
    if allowed is None or value is None or value in allowed:
        return None
    return f"{what} {value!r} is not one this worker logs to (allowed: {', '.join(allowed)})"


class WandbTracker:
    """A W&B run per job, its id `wandb_run_id(job_id)`."""

    name = "wandb"

    def __init__(self, integration: WandbIntegration, request: TrainingRequested,
                 settings: TrackerSettings, directory: Path):
        self.wandb, self.request = integration.wandb, request
        self.settings = settings.wandb
        self.directory = directory
        self.run = None

    def start(self) -> None:
        worker = self.settings
        if why := (_not_allowed("entity", self.wandb.entity, worker.entities)
                   or _not_allowed("project", self.wandb.project, worker.projects)):
            raise PermissionError(why)
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        overrides = {"mode": worker.mode, "console": "off", "silent": True, "save_code": False,
                     "disable_git": True, "x_save_requirements": False, "reinit": "create_new"}
        if worker.api_key is not None:
            overrides["api_key"] = worker.api_key.get_secret_value()
        if worker.base_url:
            overrides["base_url"] = worker.base_url
        request = self.request
        self.run = wandb.init(
            project=self.wandb.project, entity=self.wandb.entity,
            name=self.wandb.name or request.job_id, id=wandb_run_id(request.job_id),
            resume="allow",
            tags=["tunebus", request.adapter_name, request.method, *self.wandb.tags],
            config={"tunebus": _tags(request)}, dir=str(self.directory),
            settings=wandb.Settings(**overrides))

    def configure(self, resolved_args: dict[str, Any]) -> None:
        self.run.config.update(resolved_args, allow_val_change=True)

    def log(self, progress: TrainingProgress) -> None:
        self.run.log(metrics(progress), step=progress.step)

    def finish(self, outcome: Outcome) -> None:
        self.run.finish(exit_code=0 if outcome == "completed" else 1)


class MlflowTracker:
    """An MLflow run per job, tagged with the job id: a job resumed after a restart finds its
    run and goes on logging into it. The client's HTTP timeout and retries are the worker's
    settings (MLflow reads them from its environment variables, process-wide)."""

    name = "mlflow"
    STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}

    def __init__(self, integration: MlflowIntegration, request: TrainingRequested,
                 settings: TrackerSettings):
        self.mlflow, self.request = integration.mlflow, request
        self.settings = settings.mlflow
        self.client = self.run_id = None

    def start(self) -> None:
        worker = self.settings
        if why := _not_allowed("experiment", self.mlflow.experiment, worker.experiments):
            raise PermissionError(why)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(worker.request_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(worker.max_retries)
        from mlflow import MlflowClient

        self.client = client = MlflowClient(tracking_uri=worker.tracking_uri.get_secret_value())
        experiment = client.get_experiment_by_name(self.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(self.mlflow.experiment))
        job_id = self.request.job_id
        earlier = client.search_runs([experiment_id], f"tags.`tunebus.job_id` = '{job_id}'",
                                     max_results=1)
        if earlier:
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = _tags(self.request) | dict(self.mlflow.tags)
        run = client.create_run(experiment_id, run_name=self.mlflow.run_name or job_id, tags=tags)
        self.run_id = run.info.run_id

    def configure(self, resolved_args: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow params are strings of at most 6000 characters, logged once each: a resumed
        # run keeps those an earlier attempt logged and gets those it did not (it may have
        # ended between creating the run and logging them).
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(key, str(value)[:6000]) for key, value in _flat(resolved_args).items()
                  if key not in logged]
        for at in range(0, len(params), 100):  # the most one log_batch takes
            self.client.log_batch(self.run_id, params=params[at:at + 100])

    def log(self, progress: TrainingProgress) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, now, progress.step) for key, value in metrics(progress).items()])

    def finish(self, outcome: Outcome) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[outcome])


def _flat(args: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in args.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoardTracker:
    """Event files in `directory`, stored with the adapter under `tensorboard/` (float32
    scalars, as every TensorBoard writer keeps them)."""

    name = "tensorboard"

    def __init__(self, directory: Path):
        self.directory = directory
        self.writer = None

    def start(self) -> None:
        from tensorboard.summary import Writer

        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = Writer(str(self.directory))

    def configure(self, resolved_args: dict[str, Any]) -> None:
        pass  # training_args.json beside the event files says it

    def log(self, progress: TrainingProgress) -> None:
        for tag, value in metrics(progress).items():
            self.writer.add_scalar(tag, value, progress.step)
        self.writer.flush()

    def finish(self, outcome: Outcome) -> None:
        self.writer.close()
