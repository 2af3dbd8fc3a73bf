"""Checkpoints of the MLX backend: what they hold, and that a run resumed from one ends exactly as
the uninterrupted run does."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from tunebus.services.trainer.backend import (
    CheckpointState,
    TrainingHooks,
    TrainingStopped,
    checkpoint_problem,
)
from tunebus.services.trainer.backends.mlx.loop import train

from tests.helpers.backends import quick_spec, write_chat_data

SPEC = quick_spec(iters=30, checkpoint_every=10, steps_per_eval=10, grad_accumulation_steps=2)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, chat_data, tmp_path_factory):
    return train(tiny_model, chat_data, tmp_path_factory.mktemp("whole") / "adapter", SPEC)


@pytest.fixture(scope="module")
def stopped_run(tiny_model, chat_data, tmp_path_factory):
    """The same run, stopped before its 15th step; every checkpoint it handed over, kept."""
    kept = tmp_path_factory.mktemp("kept")
    checkpoints: dict[int, Path] = {}
    asked = []

    def keep(directory: Path, step: int) -> None:
        checkpoints[step] = shutil.copytree(directory, kept / f"{step}")

    def stop() -> str | None:
        asked.append(1)
        return "cancel" if len(asked) == 15 else None

    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_model, chat_data, tmp_path_factory.mktemp("stopped") / "adapter", SPEC,
              TrainingHooks(on_checkpoint=keep, should_stop=stop))
    return stopped.value, checkpoints


def test_checkpoints_come_every_n_steps_and_when_stopped(stopped_run):
    stopped, checkpoints = stopped_run
    assert (stopped.reason, stopped.step) == ("cancel", 14)
    assert sorted(checkpoints) == [10, 14]


def test_a_checkpoint_holds_weights_optimizer_rng_and_data_position_as_safetensors_and_json(stopped_run):
    _, checkpoints = stopped_run
    directory = checkpoints[10]
    assert {p.name for p in directory.iterdir()} == {
        "adapters.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    optimizer = mx.load(str(directory / "optimizer.safetensors"))
    assert optimizer["step"].item() == 5  # 10 batches, an update every 2
    assert any(name.endswith(".lora_a.m") for name in optimizer)
    assert set(mx.load(str(directory / "rng.safetensors"))) == {"mlx_key", "numpy_keys"}
    state = json.loads((directory / "state.json").read_text())
    assert (state["step"], state["total_steps"], state["backend"], state["seed"]) == (10, 30, "mlx", 0)
    assert state["rng"]["numpy"]["bit_generator"] == "MT19937"
    assert state["data_position"]["batches_drawn"] == 10
    assert [p["step"] for p in state["curve"] if "train_loss" in p] == [5, 10]


def test_a_resumed_run_ends_exactly_as_the_uninterrupted_one(stopped_run, uninterrupted, tiny_model,
                                                              chat_data, tmp_path):
    _, checkpoints = stopped_run
    resumed = train(tiny_model, chat_data, tmp_path / "adapter", SPEC, resume_from=checkpoints[14])
    assert resumed.resumed_from_step == 14
    assert resumed.curve == uninterrupted.curve
    assert (resumed.final_loss, resumed.trained_tokens) == (uninterrupted.final_loss, uninterrupted.trained_tokens)
    a = mx.load(str(uninterrupted.adapter_dir / "adapters.safetensors"))
    b = mx.load(str(resumed.adapter_dir / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_a_checkpoint_resumes_only_the_run_it_was_written_for(stopped_run):
    _, checkpoints = stopped_run
    directory = checkpoints[10]
    assert checkpoint_problem(directory, SPEC, "mlx") is None
    assert checkpoint_problem(directory, replace(SPEC, checkpoint_every=3), "mlx") is None
    assert checkpoint_problem(directory, replace(SPEC, learning_rate=0.5), "mlx") == (
        "written for different training settings")
    assert checkpoint_problem(directory, SPEC, "cuda") == "written by the mlx backend, this is cuda"
    assert CheckpointState.read(directory).step == 10
