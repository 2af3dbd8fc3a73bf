"""What the trainer-backend tests share: the backends by name, chat data on disk, a quick spec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunebus.services.trainer import backends
from tunebus.services.trainer.backend import TrainingHooks, TrainSpec

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
