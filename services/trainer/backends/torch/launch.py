"""One job over several processes of this machine: torch.distributed.run starts the ranks, this
process follows rank 0 and calls the real hooks.

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m tunebus.services.trainer.backends.torch.rank JOB_DIR/job.json

Every rank runs `loop.train` (the Trainer does DDP or FSDP; torch.distributed.run picks a free
rendezvous port, sets RANK/WORLD_SIZE and ends all ranks when one fails). Rank 0 writes what the
hooks would have been told as JSON lines to JOB_DIR/events.jsonl, in order:

    {"event": "start", "resolved_args": {...}, "resumed_from_step": null}
    {"event": "progress", "report": {...ProgressReport...}}
    {"event": "checkpoint", "directory": "JOB_DIR/checkpoints/step-8", "step": 8}
    {"event": "result", "result": {...TrainResult...}} | {"event": "stopped", "reason", "step"}

A checkpoint directory is handed over (moved out of the Trainer's output directory) and
deleted here once `hooks.on_checkpoint` returned. A stop reason from `hooks.should_stop()` is
written to JOB_DIR/stop; rank 0 reads it before each step and tells the other ranks, so all
stop after the same step. Rank 0 also stops them when the worker that launched them is gone
(killed, say): ranks that outlive their worker would hold the GPUs with no one to report to. Nothing is pickled: the job file is JSON, and so are the events.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tunebus.services.trainer.backend import (
    Distributed,
    ProgressReport,
    TrainingHooks,
    TrainingStopped,
    TrainResult,
    TrainSpec,
)

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"
CHECKPOINTS = "checkpoints"  # handed-over checkpoint directories
POLL_S = 0.05  # how often the parent looks for new events and asks should_stop


@dataclass(frozen=True)
class Job:
    """What every rank reads from job.json."""

    model_dir: str
    data_dir: str
    out_dir: str
    spec: str  # TrainSpec.to_json()
    resume_from: str | None
    options: dict  # loop.TorchOptions as a dict
    distributed: dict  # backend.Distributed as a dict
    work_dir: str  # the Trainer's output directory, shared by the ranks
    worker_pid: int  # the process that follows rank 0; the ranks stop when it is gone
    init_from: str | None = None  # the PEFT adapter every rank starts from

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> Job:
        return cls(**json.loads(path.read_text()))


def train_in_processes(model_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec,
                       hooks: TrainingHooks | None, resume_from: Path | None, *, options,
                       distributed: Distributed, init_from: Path | None = None) -> TrainResult:
    """`loop.train` run by distributed.processes ranks; what rank 0 reports goes to `hooks`."""
    hooks = hooks or TrainingHooks()
    with tempfile.TemporaryDirectory(prefix="tunebus-ranks-") as tmp:
        job_dir = Path(tmp)
        Job(model_dir=str(model_dir), data_dir=str(data_dir), out_dir=str(out_dir),
            spec=spec.to_json(), resume_from=str(resume_from) if resume_from else None,
            options=asdict(options), distributed=asdict(distributed),
            work_dir=str(job_dir / "trainer"), worker_pid=os.getpid(),
            init_from=str(init_from) if init_from else None).write(job_dir / JOB_FILE)
        (job_dir / EVENTS_FILE).touch()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={distributed.processes}",
                   "-m", "tunebus.services.trainer.backends.torch.rank", str(job_dir / JOB_FILE)]
        with open(job_dir / "ranks.log", "w+b") as log:
            ranks = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                outcome = _follow(ranks, job_dir, hooks)
            finally:
                _end(ranks)
            log.seek(0)
            output = log.read().decode(errors="replace")
    if outcome is None:
        raise RuntimeError(f"the ranks exited with {ranks.returncode} before they finished:\n"
                           + output[-4000:])
    if outcome["event"] == "stopped":
        raise TrainingStopped(outcome["reason"], outcome["step"])
    return result_from_json(outcome["result"])


def _follow(ranks: subprocess.Popen, job_dir: Path, hooks: TrainingHooks) -> dict | None:
    """Forward rank 0's events to the hooks until the ranks exit; the final event, if any."""
    stop_asked = False
    for event in _events(ranks, job_dir / EVENTS_FILE):
        if event is None:  # nothing new: a moment to ask whether to stop
            if not stop_asked and (reason := hooks.should_stop()):
                _write_atomically(job_dir / STOP_FILE, reason)
                stop_asked = True
            continue
        kind = event["event"]
        if kind == "start":
            hooks.on_start(event["resolved_args"], event["resumed_from_step"])
        elif kind == "progress":
            hooks.on_progress(ProgressReport(**event["report"]))
        elif kind == "checkpoint":
            directory = Path(event["directory"])
            try:
                hooks.on_checkpoint(directory, event["step"])
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        elif kind in ("result", "stopped"):
            return event
    return None


def _events(ranks: subprocess.Popen, path: Path) -> Iterator[dict | None]:
    """Each complete line of `path` as it is written, None while there is none, until the ranks
    have exited and every line is read."""
    with open(path, encoding="utf-8") as f:
        partial = ""
        while True:
            exited = ranks.poll() is not None
            line = f.readline()
            if line:
                partial += line
                if partial.endswith("\n"):
                    yield json.loads(partial)
                    partial = ""
                continue
            if exited:
                return
            yield None
            time.sleep(POLL_S)


def _end(ranks: subprocess.Popen) -> None:
    """torch.distributed.run passes SIGTERM to its ranks; SIGKILL the group if that is ignored."""
    if ranks.poll() is not None:
        return
    os.killpg(ranks.pid, signal.SIGTERM)
    try:
        ranks.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(ranks.pid, signal.SIGKILL)
        ranks.wait()


def stop_reason(stop_file: Path, worker_pid: int) -> str | None:
    """What rank 0 tells every rank before a step: the worker's stop reason, or that it is gone."""
    if stop_file.exists():
        return stop_file.read_text()
    try:
        os.kill(worker_pid, 0)
    except ProcessLookupError:
        return f"the worker (pid {worker_pid}) that started this job is gone"
    except PermissionError:  # alive, someone else's: not ours, but not gone either
        pass
    return None


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def result_to_json(result: TrainResult) -> dict:
    data = asdict(result)
    for name in ("adapter_dir", "merged_dir"):
        data[name] = None if data[name] is None else str(data[name])
    return data


def result_from_json(data: dict) -> TrainResult:
    paths = {name: None if data[name] is None else Path(data[name])
             for name in ("adapter_dir", "merged_dir")}
    return TrainResult(**data | paths)
