"""What the trainer-backend tests share: the backends by name, chat data on disk, a quick spec,
and the runs a resume is tested with."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tunebus.services.trainer import backends
from tunebus.services.trainer.backend import LoraSpec, TrainingHooks, TrainingStopped, TrainSpec
from tunebus.shared.adapter_layouts import MLX, PEFT_DIR

NAMES = list(backends.BACKENDS)  # every backend, as requests and settings name it
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Where is the ball?", "The ball is in the garden."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who bakes the bread?", "The baker bakes the bread."),
]


def train(backend: str, *args, **kwargs):
    """`backend`'s training loop (TrainerBackend.train), as the runner calls it."""
    return backends.load(backend).train(*args, **kwargs)


def chat_example(i: int) -> dict:
    question, answer = FACTS[i % len(FACTS)]
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_chat_data(data_dir: Path, n_train: int = 40, n_valid: int = 8) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        lines = [json.dumps(chat_example(i)) for i in range(n)]
        (data_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return data_dir


def quick_spec(**overrides) -> TrainSpec:
    settings = dict(
        iters=30, learning_rate=1e-2, steps_per_report=5, steps_per_eval=10, val_batches=2
    )
    return TrainSpec(**(settings | overrides))


class Recorder:
    """Hooks that keep every checkpoint handed over and can stop after a given step."""

    def __init__(self, keep: Path, stop_after: int | None = None):
        self.keep = keep
        self.stop_after = stop_after
        self.steps: list[int] = []
        self.reports = []

    def hooks(self) -> TrainingHooks:
        return TrainingHooks(on_progress=self.on_progress, on_checkpoint=self.on_checkpoint,
                             should_stop=self.should_stop)

    def on_progress(self, report):
        self.reports.append(report)

    def on_checkpoint(self, directory: Path, step: int):
        shutil.copytree(directory, self.keep / f"step-{step}")
        self.steps.append(step)

    def should_stop(self):
        done = self.reports[-1].step if self.reports else 0
        return "told to stop" if self.stop_after is not None and done >= self.stop_after else None


class StopOnAsk(Recorder):
    """A Recorder that says stop the `ask`-th time it is asked (a backend asks before its first
    step, then when a step ends: MLX after each batch, torch after each optimizer update)."""

    def __init__(self, keep: Path, ask: int):
        super().__init__(keep)
        self.ask = ask
        self.asked = 0

    def should_stop(self):
        self.asked += 1
        return "cancel" if self.asked == self.ask else None


@dataclass(frozen=True)
class ResumeCase:
    """A run to stop at a checkpoint and resume, per backend: what differs is a row of RESUME."""

    spec: TrainSpec
    n_train: int
    n_valid: int
    stop_on_ask: int  # the should_stop call that says stop
    resume_periodic: bool  # resume from a periodic checkpoint too, as after a killed worker


# Accumulation on both; on torch dropout and warmup too: a resume that missed the RNG, optimizer
# or schedule state would end with other weights.
RESUME = {
    "mlx": ResumeCase(quick_spec(iters=30, checkpoint_every=10, steps_per_eval=10,
                                 grad_accumulation_steps=2),
                      n_train=40, n_valid=8, stop_on_ask=15, resume_periodic=False),
    "cuda": ResumeCase(quick_spec(iters=24, batch_size=2, steps_per_report=4, steps_per_eval=8,
                                  checkpoint_every=8, grad_accumulation_steps=2, warmup_steps=4,
                                  lora=LoraSpec(dropout=0.1)),
                       n_train=30, n_valid=4, stop_on_ask=7, resume_periodic=True),
}


# A run continued from the quick LoRA run (init_from), reporting every step, stopped after
# step 3 (MLX asks before each batch, torch after each update) and resumed.
CONTINUE = {
    backend: ResumeCase(quick_spec(iters=6, steps_per_report=1, steps_per_eval=3,
                                   checkpoint_every=2, init_from="parent:1"),
                        n_train=40, n_valid=8, stop_on_ask=4, resume_periodic=False)
    for backend in NAMES
}


# A full fine-tune (every weight, adam state for each) stopped after step 6 on both backends: MLX
# asks before every batch, torch before the first and after each update of 2 batches.
FULL_RESUME = {
    "mlx": ResumeCase(quick_spec(iters=8, learning_rate=1e-3, checkpoint_every=4,
                                 steps_per_report=2, steps_per_eval=4, grad_accumulation_steps=2,
                                 lora=LoraSpec(kind="full")),
                      n_train=16, n_valid=4, stop_on_ask=7, resume_periodic=False),
    "cuda": ResumeCase(quick_spec(iters=8, batch_size=2, learning_rate=1e-3, checkpoint_every=4,
                                  steps_per_report=2, steps_per_eval=4, grad_accumulation_steps=2,
                                  warmup_steps=1, lora=LoraSpec(kind="full")),
                       n_train=16, n_valid=4, stop_on_ask=4, resume_periodic=True),
}


def layout_dir(backend: str, adapter_dir: Path) -> Path:
    """Where in a trained adapter directory the layout `backend` trains in is."""
    return adapter_dir / ("" if backends.BACKENDS[backend].layout == MLX else PEFT_DIR)


class ResumeRuns:
    """One backend's RESUME run (or `case`, started from the adapter in `init_from`)
    uninterrupted, stopped and resumed, each trained when first read (the suite and the
    backend's own tests share them)."""

    def __init__(self, backend: str, model_dir: Path, root: Path, case: ResumeCase | None = None,
                 init_from: Path | None = None):
        self.backend, self.model_dir, self.root = backend, model_dir, root
        self.case = case or RESUME[backend]
        self.init_from = init_from
        self.data = write_chat_data(root / "data", self.case.n_train, self.case.n_valid)
        self._resumed: dict[int, tuple] = {}

    @cached_property
    def uninterrupted(self) -> tuple:
        """(result, Recorder of its checkpoints and reports)."""
        recorder = Recorder(self.root / "whole-checkpoints")
        result = train(self.backend, self.model_dir, self.data, self.root / "whole", self.case.spec,
                       recorder.hooks(), init_from=self.init_from)
        return result, recorder

    @cached_property
    def stopped(self) -> tuple:
        """(TrainingStopped, StopOnAsk of its checkpoints, the adapter directory it had)."""
        stopping = StopOnAsk(self.root / "stopped-checkpoints", self.case.stop_on_ask)
        out_dir = self.root / "stopped"
        try:
            train(self.backend, self.model_dir, self.data, out_dir, self.case.spec,
                  stopping.hooks(), init_from=self.init_from)
        except TrainingStopped as stopped:
            return stopped, stopping, out_dir
        raise AssertionError(f"the {self.backend} run did not stop")

    def resumed(self, checkpoint: Path) -> tuple:
        """(result, Recorder) of the run resumed from `checkpoint`."""
        key = str(checkpoint)
        if key not in self._resumed:
            name = f"resumed-{len(self._resumed)}"
            recorder = Recorder(self.root / f"{name}-checkpoints")
            result = train(self.backend, self.model_dir, self.data, self.root / name,
                           self.case.spec, recorder.hooks(), resume_from=checkpoint,
                           init_from=self.init_from)
            self._resumed[key] = result, recorder
        return self._resumed[key]
