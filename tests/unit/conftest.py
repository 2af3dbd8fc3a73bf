"""The quick LoRA run of each trainer backend, and its runs stopped at a checkpoint and resumed,
trained once per session and shared by the backend contract suite and each backend's own tests."""

from __future__ import annotations

import pytest
from tunebus.services.trainer.backend import TrainingHooks

from tests.helpers.backends import (
    CONTINUE,
    ResumeRuns,
    layout_dir,
    quick_spec,
    train,
    write_chat_data,
)


@pytest.fixture(scope="session")
def lora_runs(tiny_model, tmp_path_factory):
    """backend -> (result, progress reports, on_start calls) of a 30-step LoRA run on chat data,
    reporting every 5 steps and validating every 10."""
    runs: dict[str, tuple] = {}

    def run(backend: str) -> tuple:
        if backend not in runs:
            data = write_chat_data(tmp_path_factory.mktemp(f"data-{backend}"))
            reports, started = [], []
            hooks = TrainingHooks(on_progress=reports.append,
                                  on_start=lambda args, step: started.append((args, step)))
            result = train(backend, tiny_model, data, tmp_path_factory.mktemp(f"lora-{backend}"),
                           quick_spec(), hooks)
            runs[backend] = (result, reports, started)
        return runs[backend]

    return run


@pytest.fixture(scope="session")
def resume_runs(tiny_model, tmp_path_factory):
    """backend -> its ResumeRuns (the RESUME row uninterrupted, stopped and resumed), each run
    trained the first time a test reads it."""
    runs: dict[str, ResumeRuns] = {}

    def run(backend: str) -> ResumeRuns:
        if backend not in runs:
            root = tmp_path_factory.mktemp(f"resume-{backend}")
            runs[backend] = ResumeRuns(backend, tiny_model, root)
        return runs[backend]

    return run


@pytest.fixture(scope="session")
def continued_runs(tiny_model, tmp_path_factory, lora_runs):
    """backend -> ResumeRuns of its CONTINUE row, started from its quick LoRA run (init_from)."""
    runs: dict[str, ResumeRuns] = {}

    def run(backend: str) -> ResumeRuns:
        if backend not in runs:
            parent = layout_dir(backend, lora_runs(backend)[0].adapter_dir)
            runs[backend] = ResumeRuns(backend, tiny_model, tmp_path_factory.mktemp(
                f"continued-{backend}"), case=CONTINUE[backend], init_from=parent)
        return runs[backend]

    return run
