"""One training job on this worker: fetch model and data, pick up the latest checkpoint, train
with the worker's backend, store the adapter and its files. The app decides what to say about it.

The backend runs in its own thread (`BackendThread`); what it reports (start, progress) is handed
to the event loop through an `Outbox`, which publishes in order, and checkpoints are uploaded from
that thread as they are written.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tunebus.contracts import (
    Artifact,
    DatasetValidatedEvent,
    TrainingCompleted,
    TrainingMetrics,
    TrainingProgress,
    TrainingStarted,
)
from tunebus.contracts.training import TrainerCapabilities
from tunebus.shared.adapter_layouts import FULL as FULL_LAYOUT
from tunebus.shared.adapter_layouts import TENSORBOARD_DIR, adapter_prefix, layouts
from tunebus.shared.models import ModelNotFound, ModelRefused, resolve_model
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore, StoreUnavailable
from tunebus.shared.service import Service
from tunebus.shared.threads import BackendThread
from tunebus.shared.threads import backend_thread as named_backend_thread

from . import backends
from .artifacts import (
    LOSS_CURVE,
    add_peft_layout,
    applied_mask_prompt,
    ship_mlx_config,
    without_worker_paths,
    write_run_files,
)
from .backend import (
    FULL,
    Distributed,
    ProgressReport,
    TrainingHooks,
    TrainingStopped,
    TrainResult,
    TrainSpec,
    checkpoint_problem,
)
from .checkpoints import CheckpointStore, StoredCheckpoint
from .memory import full_fine_tune_refusal
from .parents import InitFromRefused, fetch_parent, find_parent, started_parent
from .plan import Parent, continued_adapter, init_from_refusal, progress_payload, train_spec
from .trackers import Trackers, TrackerUnavailable, open_trackers

log = structlog.get_logger()

# A backend's loop is imported once the service runs, never with the service module: the ML
# stack is heavy, and the service must import without it (AsyncAPI generation).
load_backend = backends.load


def backend_thread() -> BackendThread:
    """The trainer's backend thread (tunebus.shared.threads says why not asyncio's executor)."""
    return named_backend_thread("trainer-backend")


class JobFailed(Exception):
    """The job cannot succeed on a retry either: report it."""

    def __init__(self, reason: str, error_type: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


class JobStopped(Exception):
    """Training stopped before its end (shutdown or cancel); `checkpoint` is the last one kept."""

    def __init__(self, reason: str, step: int, checkpoint: StoredCheckpoint | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainingRun:
    service: Service
    backend: str
    worker: str
    event: DatasetValidatedEvent
    on_started: Callable[[TrainingStarted], Awaitable[None]]
    on_progress: Callable[[TrainingProgress], Awaitable[None]]
    should_stop: Callable[[], str | None]
    capabilities: TrainerCapabilities | None = None  # the worker's: memory for a full fine-tune
    last_checkpoint: StoredCheckpoint | None = field(default=None, init=False)
    parent: Parent | None = field(default=None, init=False)  # what init_from named, found
    timings: dict[str, float] = field(default_factory=dict, init=False)  # seconds per phase

    async def run(self) -> TrainingCompleted:
        request, dataset = self.event.data.request, self.event.data.dataset
        settings = self.service.settings
        job_dir = settings.work_dir / "jobs" / request.job_id
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            adapter_uri = adapter_prefix(settings.s3.adapters_bucket, request.adapter_name, request.job_id)
            checkpoints = CheckpointStore(self.service.store, adapter_uri,
                                          keep=settings.trainer.keep_checkpoints)
            if request.init_from is not None:
                # A job with a checkpoint to resume from needs its parent's ref and shape only,
                # which the checkpoint records; the registry is asked when it starts afresh.
                self.parent = (await asyncio.to_thread(started_parent, checkpoints)
                               or await self._parent(checkpoints))
            model_dir, data_dir = await self._fetch(job_dir / "data")
            spec = self._spec()
            if spec.lora.kind == FULL:
                await asyncio.to_thread(self._check_full_fits, model_dir, spec)
            resume = await asyncio.to_thread(self._resumable, checkpoints, spec, job_dir / "resume")
            init_dir = None
            if self.parent is not None and resume is None:
                if not self.parent.files:  # its checkpoint does not resume this run after all
                    self.parent = await self._parent(checkpoints)
                    spec = self._spec()
                init_dir = await self._fetch_parent(job_dir / "parent", model_dir)
            trackers = open_trackers(request, settings.trainer.trackers,
                                     job_dir=job_dir / "trackers", work_dir=settings.work_dir)
            event_files = EventFiles(self.service.store, f"{adapter_uri}/{TENSORBOARD_DIR}",
                                     trackers.tensorboard_dir)
            if resume is not None:
                await asyncio.to_thread(event_files.fetch)
            result = await self._train(spec, model_dir, data_dir, job_dir / "adapter", checkpoints,
                                       resume, job_dir / "resume", trackers, event_files, init_dir)
            if trackers.tensorboard_dir is not None and trackers.tensorboard_dir.is_dir():
                shutil.copytree(trackers.tensorboard_dir, result.adapter_dir / TENSORBOARD_DIR)
            return await self._store(result, adapter_uri, spec)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _spec(self) -> TrainSpec:
        request, settings = self.event.data.request, self.service.settings
        return train_spec(request, self.event.data.dataset,
                          checkpoint_every=settings.trainer.checkpoint_every,
                          report_interval_s=settings.trainer.progress_interval_s,
                          parent=self.parent)

    async def _parent(self, checkpoints: CheckpointStore) -> Parent:
        """What the request's init_from names, if this job can continue from it (JobFailed
        saying why not; a registry that does not answer is retried). A job resumed from a
        checkpoint keeps the parent version it started from, even if an alias has moved."""
        request, settings = self.event.data.request, self.service.settings
        ref = await asyncio.to_thread(checkpoints.started_from) or request.init_from
        try:
            parent = await find_parent(ref, self.service.broker, self.service.store,
                                       settings.s3.adapters_bucket)
        except InitFromRefused as e:
            raise JobFailed(str(e), "init_from") from None
        if reason := init_from_refusal(request, parent):
            raise JobFailed(reason, "init_from")
        log.info("continuing from a parent adapter", init_from=request.init_from, parent=parent.ref)
        return parent

    async def _fetch_parent(self, directory: Path, model_dir: Path) -> Path:
        """The parent's adapter, in the layout this worker's backend trains in."""
        layout = backends.BACKENDS[self.backend].layout
        tic = time.perf_counter()
        try:
            return await asyncio.to_thread(
                fetch_parent, self.service.store, self.parent, layout, directory,
                base_model=self.event.data.request.base_model, model_dir=model_dir)
        except InitFromRefused as e:
            raise JobFailed(str(e), "init_from") from None
        finally:
            self.timings["parent_download"] = time.perf_counter() - tic

    def _check_full_fits(self, model_dir: Path, spec: TrainSpec) -> None:
        """Refuse a full fine-tune that the worker's memory cannot hold (tunebus.services.
        trainer.memory), before any weights are loaded."""
        caps, distributed = self.capabilities, self.distributed
        shards = distributed.processes if distributed.strategy == "fsdp" else 1
        try:
            reason = full_fine_tune_refusal(model_dir, spec, caps and caps.memory_bytes,
                                            caps and caps.full_dtype, shards)
        except (OSError, ValueError) as e:  # no safetensors, no or a broken config.json
            raise JobFailed(f"adapter.type 'full': the base model cannot be sized to check "
                            f"that it fits ({e})", "model_refused") from None
        if reason:
            raise JobFailed(reason, "model_too_large")

    async def _fetch(self, data_dir: Path) -> tuple[Path, Path]:
        """The base model (cached per worker) and the validated splits, on local disk."""
        request, dataset = self.event.data.request, self.event.data.dataset
        store, settings = self.service.store, self.service.settings
        tic = time.perf_counter()
        try:
            model_dir = await asyncio.to_thread(
                resolve_model, request.base_model, store, settings.work_dir / "models",
                request.base_model_revision, models_root=settings.models_root)
        except ModelRefused as e:
            raise JobFailed(str(e), "model_refused") from None
        except ModelNotFound as e:
            raise JobFailed(str(e), "model_not_found") from None
        self.timings["model_resolve"] = time.perf_counter() - tic
        tic = time.perf_counter()
        await asyncio.to_thread(store.get_file, dataset.train_uri, data_dir / "train.jsonl")
        await asyncio.to_thread(store.get_file, dataset.valid_uri, data_dir / "valid.jsonl")
        self.timings["data_download"] = time.perf_counter() - tic
        return model_dir, data_dir

    async def _train(self, spec: TrainSpec, model_dir: Path, data_dir: Path, out_dir: Path,
                     checkpoints: CheckpointStore, resume: StoredCheckpoint | None,
                     resume_dir: Path, trackers: Trackers,
                     event_files: EventFiles, init_dir: Path | None = None) -> TrainResult:
        """The backend's run in a worker thread, its reports published as they come, and handed
        to the request's trackers, which queue them for their own thread: a tracker that is
        slow or down never holds back the bus's events (tunebus.services.trainer.trackers)."""
        request, dataset = self.event.data.request, self.event.data.dataset
        job_id = request.job_id
        self.last_checkpoint = resume
        outbox = Outbox()
        iters_per_epoch = max(1.0, dataset.train_rows / spec.batch_size / spec.grad_accumulation_steps)

        def on_start(resolved_args: dict, resumed_from: int | None) -> None:
            trackers.configure(resolved_args)  # as stored with the adapter: no worker paths
            outbox.put(self.on_started, TrainingStarted(
                job_id=job_id, adapter_name=request.adapter_name, backend=self.backend,
                worker=self.worker, total_steps=spec.iters, resolved_args=resolved_args,
                resumed_from_step=resumed_from,
                checkpoint_uri=resume.uri if resume and resumed_from else None))

        def on_progress(report: ProgressReport) -> None:
            progress = progress_payload(job_id, report, iters_per_epoch)
            outbox.put(self.on_progress, progress)
            trackers.log(progress)

        def on_checkpoint(directory: Path, step: int) -> None:
            self.last_checkpoint = checkpoints.upload(directory, step)
            event_files.store()
            log.info("checkpoint stored", step=step, uri=self.last_checkpoint.uri)

        hooks = TrainingHooks(on_start=on_start, on_progress=on_progress,
                              on_checkpoint=on_checkpoint, should_stop=self.should_stop)
        backend = await backend_thread().run(load_backend, self.backend)
        try:
            await asyncio.to_thread(trackers.start)
        except TrackerUnavailable as e:
            raise JobFailed(str(e), "integration_unavailable") from None
        outcome = "failed"
        try:
            async with outbox.running():
                result = await self._run_backend(backend, model_dir, data_dir, out_dir, spec,
                                                 hooks, resume_dir if resume else None,
                                                 init_dir)
            outcome = "completed"
            return result
        except JobStopped:
            outcome = "stopped"
            raise
        finally:  # waits at most the trackers' finish_timeout_s
            await asyncio.to_thread(trackers.finish, outcome)

    async def _run_backend(self, backend, model_dir: Path, data_dir: Path, out_dir: Path,
                           spec: TrainSpec, hooks: TrainingHooks,
                           resume_dir: Path | None, init_dir: Path | None) -> TrainResult:
        try:
            return await backend_thread().run(backend.train, model_dir, data_dir, out_dir, spec,
                                            hooks, resume_dir, distributed=self.distributed,
                                            init_from=init_dir)
        except TrainingStopped as e:
            raise JobStopped(e.reason, e.step, self.last_checkpoint) from None
        except Exception as e:
            if unavailable := _store_unavailable(e):
                # S3 stayed down past its retry bound (a checkpoint upload, say): hand the
                # job back; the next attempt resumes from the last stored checkpoint.
                raise unavailable from e
            # Anything else repeats on retry (bad data, a bug, out of memory): report it.
            log.exception("training raised")
            raise JobFailed(f"{type(e).__name__}: {e}", _error_type(e)) from None

    async def _store(self, result: TrainResult, adapter_uri: str,
                     spec: TrainSpec) -> TrainingCompleted:
        """The adapter with the files that explain it, in S3; what TrainingCompleted says."""
        request, dataset = self.event.data.request, self.event.data.dataset
        timings = self.timings | result.timings
        training_seconds = timings.get("training") or result.seconds
        metrics = TrainingMetrics(
            first_loss=result.first_loss, final_loss=result.final_loss,
            final_val_loss=result.final_val_loss, steps=result.steps,
            trained_tokens=result.trained_tokens, seconds=result.seconds,
            tokens_per_second=result.trained_tokens / training_seconds if training_seconds else 0.0,
            first_reward=result.first_reward, final_reward=result.final_reward,
            resumed_from_step=result.resumed_from_step, best_val_loss=result.best_val_loss,
            best_step=result.best_step, early_stopped=result.early_stopped, timings=timings,
        )
        shipped_args = without_worker_paths(result.resolved_args, request.base_model,
                                            request.base_model_revision)
        await asyncio.to_thread(write_run_files, result.adapter_dir, shipped_args, metrics,
                                result.curve, f"{request.adapter_name} · {request.job_id} · {request.method}")
        full = spec.lora.kind == FULL  # a whole model under full/: no adapter layouts
        if not full:
            await asyncio.to_thread(ship_mlx_config, result.adapter_dir, request.base_model,
                                    request.base_model_revision)
            await asyncio.to_thread(add_peft_layout, result.adapter_dir, request.base_model,
                                    request.base_model_revision)
        stored = await asyncio.to_thread(self.service.store.put_dir, adapter_uri, result.adapter_dir)
        artifacts = [Artifact(name=o.uri.removeprefix(adapter_uri + "/"), uri=o.uri,
                              sha256=o.sha256, size=o.size) for o in stored]
        return TrainingCompleted(
            job_id=request.job_id, request=request, dataset=dataset, backend=self.backend,
            adapter_uri=adapter_uri, artifacts=artifacts,
            metrics=metrics, resolved_args=result.resolved_args,
            merged_model_uri=f"{adapter_uri}/merged" if result.merged_dir else None,
            layouts=layouts([a.name for a in artifacts]),
            format=FULL_LAYOUT if full else backends.BACKENDS[self.backend].layout,
            mask_prompt=applied_mask_prompt(result.resolved_args, spec.mask_prompt),
            loss_curve=LOSS_CURVE,
            parent=self.parent.ref if self.parent else None,
            adapter=continued_adapter(request, self.parent) if self.parent else None,
        )

    @property
    def distributed(self) -> Distributed:
        """How many processes run the job, from the worker's settings (a property of the node,
        not of the request)."""
        trainer = self.service.settings.trainer
        return Distributed(processes=trainer.processes, strategy=trainer.distributed)

    def _resumable(self, checkpoints: CheckpointStore, spec: TrainSpec,
                   directory: Path) -> StoredCheckpoint | None:
        """The latest checkpoint of this job, downloaded, if it fits this run."""
        latest = checkpoints.latest()
        if latest is None:
            return None
        checkpoints.download(latest, directory)
        if problem := checkpoint_problem(directory, spec, self.backend,
                                         processes=self.distributed.processes):
            log.warning("not resuming from checkpoint", uri=latest.uri, problem=problem)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        log.info("resuming from checkpoint", step=latest.step, uri=latest.uri)
        return latest


def _store_unavailable(error: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable behind an error a backend raised (it may wrap what a hook raised)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StoreUnavailable):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _error_type(error: BaseException) -> str:
    """What kind of deterministic failure ended a training, as TrainingFailed.error_type says."""
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "out_of_memory"
    return "training_error"


@dataclass
class EventFiles:
    """A job's TensorBoard event files, kept in S3 (where they end up, beside the adapter) at
    every checkpoint and fetched back when the job resumes: a resumed run's writer adds a file
    whose steps restart after the checkpoint, and TensorBoard's readers drop the older file's
    events from that step on (an out-of-order step purges), so the files read as one run."""

    objects: ObjectStore
    uri: str
    directory: Path | None  # None: the request asked for no TensorBoard

    def store(self) -> None:
        if self.directory is not None and self.directory.is_dir():
            self.objects.put_dir(self.uri, self.directory)

    def fetch(self) -> None:
        if self.directory is None:
            return
        try:
            self.objects.get_dir(self.uri, self.directory)
        except ObjectNotFound:
            pass  # stopped before its first checkpoint with TensorBoard


class Outbox:
    """Messages from the training thread, published by one task on the event loop, in order."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, send: Callable[[object], Awaitable[None]], message: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (send, message))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Outbox]:
        """Publish while open; on leaving, everything put before is published first."""
        task = asyncio.create_task(self._drain())
        try:
            yield self
        finally:
            await self.queue.put(None)
            await task

    async def _drain(self) -> None:
        while (item := await self.queue.get()) is not None:
            send, message = item
            try:
                await send(message)
            except Exception:  # progress is best effort; the job's outcome is published apart
                log.exception("could not publish a training update")

