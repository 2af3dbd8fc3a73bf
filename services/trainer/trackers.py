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

import importlib.util
import math
import time
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
    if "mlflow" not in why and not settings.mlflow.tracking_uri:
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


@dataclass
class Trackers:
    """The trackers of one job. `start` raises TrackerUnavailable when one cannot open its run
    (the job fails with that reason, before training); later errors are logged and training
    goes on: a tracker observes a run, it does not decide it."""

    trackers: list[Tracker]
    tensorboard_dir: Path | None = None  # its event files, to be stored with the adapter
    started: list[Tracker] = field(default_factory=list)

    def start(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.start()
            except Exception as e:
                self.finish("failed")
                raise TrackerUnavailable(f"integration {tracker.name}: could not start its run: "
                                         f"{type(e).__name__}: {e}") from e
            self.started.append(tracker)

    def configure(self, resolved_args: dict[str, Any]) -> None:
        self._each("configure", resolved_args)

    def log(self, progress: TrainingProgress) -> None:
        self._each("log", progress)

    def finish(self, outcome: Outcome) -> None:
        self._each("finish", outcome)
        self.started = []

    def _each(self, call: str, argument: Any) -> None:
        for tracker in self.started:
            try:
                getattr(tracker, call)(argument)
            except Exception as e:
                log.warning("tracker call failed", tracker=tracker.name, call=call,
                            error=f"{type(e).__name__}: {e}")


class TrackerUnavailable(Exception):
    pass


def open_trackers(request: TrainingRequested, settings: TrackerSettings, *, job_dir: Path,
                  work_dir: Path) -> Trackers:
    """The trackers `request.integrations` names (none started yet). TensorBoard writes under
    `job_dir`, W&B (offline runs, for `wandb sync`) under its `dir` setting or `work_dir`."""
    trackers = [_tracker(integration, request, settings, job_dir=job_dir, work_dir=work_dir)
                for integration in request.integrations]
    tensorboard = [t.directory for t in trackers if isinstance(t, TensorBoardTracker)]
    return Trackers(trackers, tensorboard[0] if tensorboard else None)


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


class WandbTracker:
    """A W&B run per job, its id the job id (whose characters, letters, digits, - and _, are
    those a run id may hold): a job resumed after a restart goes on logging into the same run."""

    name = "wandb"

    def __init__(self, integration: WandbIntegration, request: TrainingRequested,
                 settings: TrackerSettings, directory: Path):
        self.wandb, self.request = integration.wandb, request
        self.settings = settings.wandb
        self.directory = directory
        self.run = None

    def start(self) -> None:
        import wandb

        worker = self.settings
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
            name=self.wandb.name or request.job_id, id=request.job_id, resume="allow",
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
    run and goes on logging into it."""

    name = "mlflow"
    STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}

    def __init__(self, integration: MlflowIntegration, request: TrainingRequested,
                 settings: TrackerSettings):
        self.mlflow, self.request = integration.mlflow, request
        self.tracking_uri = settings.mlflow.tracking_uri
        self.client = self.run_id = None
        self.resumed = False

    def start(self) -> None:
        from mlflow import MlflowClient

        self.client = client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.mlflow.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(self.mlflow.experiment))
        job_id = self.request.job_id
        earlier = client.search_runs([experiment_id], f"tags.`tunebus.job_id` = '{job_id}'",
                                     max_results=1)
        self.resumed = bool(earlier)
        if earlier:
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = _tags(self.request) | dict(self.mlflow.tags)
        run = client.create_run(experiment_id, run_name=self.mlflow.run_name or job_id, tags=tags)
        self.run_id = run.info.run_id

    def configure(self, resolved_args: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.resumed:  # MLflow params are written once: the first attempt's stand
            return
        # MLflow params are strings of at most 6000 characters, logged once each.
        params = [Param(key, str(value)[:6000]) for key, value in _flat(resolved_args).items()]
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
