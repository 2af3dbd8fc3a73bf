"""One rank of a job that several processes run (see `launch`): started by torch.distributed.run,

    python -m tunebus.services.trainer.backends.torch.rank JOB_DIR/job.json

it runs `loop.train` like every other rank. Rank 0's hooks write events for the parent; the
other ranks' hooks say nothing. `should_stop` is rank 0's reading of the stop file, broadcast, so
that every rank stops after the same step.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from tunebus.services.trainer.backend import (
    Distributed,
    ProgressReport,
    TrainingHooks,
    TrainingStopped,
    TrainSpec,
)

from . import loop
from .launch import CHECKPOINTS, EVENTS_FILE, STOP_FILE, Job, result_to_json, stop_reason


def main(job_file: Path) -> None:
    job = Job.read(job_file)
    job_dir = job_file.parent
    hooks = RankZero(job_dir).hooks() if PartialState().is_main_process else TrainingHooks()
    hooks.should_stop = _agreed(job_dir / STOP_FILE, job.worker_pid)
    try:
        result = loop.train(
            Path(job.model_dir), Path(job.data_dir), Path(job.out_dir), TrainSpec.from_json(job.spec),
            hooks, Path(job.resume_from) if job.resume_from else None,
            options=loop.TorchOptions(**job.options), distributed=Distributed(**job.distributed),
            work_dir=Path(job.work_dir), init_from=Path(job.init_from) if job.init_from else None)
    except TrainingStopped as e:
        _say(job_dir, {"event": "stopped", "reason": e.reason, "step": e.step})
    else:
        _say(job_dir, {"event": "result", "result": result_to_json(result)})
    finally:
        PartialState().wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()


class RankZero:
    """Rank 0's hooks: every call one line of events.jsonl; checkpoints moved to the parent."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        (job_dir / CHECKPOINTS).mkdir(exist_ok=True)

    def hooks(self) -> TrainingHooks:
        return TrainingHooks(on_start=self.on_start, on_progress=self.on_progress,
                             on_checkpoint=self.on_checkpoint)

    def on_start(self, resolved_args: dict, resumed_from_step: int | None) -> None:
        _say(self.job_dir, {"event": "start", "resolved_args": resolved_args,
                            "resumed_from_step": resumed_from_step})

    def on_progress(self, report: ProgressReport) -> None:
        _say(self.job_dir, {"event": "progress", "report": asdict(report)})

    def on_checkpoint(self, directory: Path, step: int) -> None:
        handed = self.job_dir / CHECKPOINTS / f"step-{step}"
        shutil.move(directory, handed)  # the parent deletes it once uploaded
        _say(self.job_dir, {"event": "checkpoint", "directory": str(handed), "step": step})


def _agreed(stop_file: Path, worker_pid: int):
    """should_stop for every rank: rank 0 decides (`launch.stop_reason`) and broadcasts it."""
    state = PartialState()

    def should_stop() -> str | None:
        here = stop_reason(stop_file, worker_pid) if state.is_main_process else None
        flag = torch.tensor([1 if here else 0], device=state.device)
        dist.broadcast(flag, src=0)
        return (here or "stopped by rank 0") if flag.item() else None

    return should_stop


def _say(job_dir: Path, event: dict) -> None:
    if not PartialState().is_main_process:
        return
    with open(job_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
